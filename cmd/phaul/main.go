// Command phaul moves running process trees between Linux hosts.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	app := &cli.App{
		Name:  "phaul",
		Usage: "live-migrate a process tree between Linux hosts with CRIU",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "criu", Usage: "CRIU binary (default: $PHAUL_CRIU, /opt/phaul/criu/bin/criu, criu on PATH)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.BoolFlag{Name: "log-json", Usage: "log as JSON lines"},
		},
		Commands: []*cli.Command{
			migrateCommand(),
			serveCommand(),
			checkCommand(),
			certsCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main reports errors once
	}
	err := app.RunContext(ctx, os.Args)
	if err == nil {
		return
	}
	code := 1
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		code = ec.ExitCode()
	}
	if msg := err.Error(); msg != "" {
		fmt.Fprintln(os.Stderr, "phaul:", msg)
	}
	os.Exit(code)
}

// Command phaul moves running process trees between Linux hosts.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
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
			criuFlag(),
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.BoolFlag{Name: "log-json", Usage: "log as JSON lines"},
		},
		Commands: []*cli.Command{
			migrateCommand(),
			serveCommand(),
			checkCommand(),
			certsCommand(),
			pageServerCommand(),
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
		if !strings.HasPrefix(msg, "phaul: ") {
			msg = "phaul: " + msg
		}
		fmt.Fprintln(os.Stderr, msg)
	}
	os.Exit(code)
}

// criuFlag is --criu, accepted globally and by every command that runs CRIU
// (read it with stringFlag).
func criuFlag() cli.Flag {
	return &cli.StringFlag{Name: "criu", Usage: "CRIU binary (default: $PHAUL_CRIU, /opt/phaul/criu/bin/criu, criu on PATH)"}
}

// stringFlag returns the innermost explicitly set value of a flag defined
// both globally and on the command. c.String alone would return the
// command's unset default and hide `phaul --criu X check`.
func stringFlag(c *cli.Context, name string) string {
	for _, cc := range c.Lineage() {
		if slices.Contains(cc.LocalFlagNames(), name) {
			return cc.String(name)
		}
	}
	return c.String(name)
}

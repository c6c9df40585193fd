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

	"github.com/phaul/phaul/core/criu"
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
			gcCommand(),
			cancelCommand(),
			recoverCommand(),
			lazyPagesCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main reports errors once
	}
	err := app.RunContext(ctx, bareManageCgroups(os.Args))
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

// bareManageCgroups gives a bare --manage-cgroups the value CRIU gives it:
// CRIU's option takes its mode only as --manage-cgroups=MODE and means
// soft without one. phaul also takes the mode as the next argument, when
// that argument names a mode.
func bareManageCgroups(args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(out, args[i:]...)
		}
		if a == "--manage-cgroups" || a == "-manage-cgroups" {
			if i+1 < len(args) && isCgroupMode(args[i+1]) {
				out = append(out, a, args[i+1])
				i++
				continue
			}
			a += "=soft"
		}
		out = append(out, a)
	}
	return out
}

func isCgroupMode(s string) bool {
	_, ok := criu.CgroupModes[s]
	return ok
}

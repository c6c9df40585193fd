package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/phaul"
)

func recoverCommand() *cli.Command {
	def := phaul.DefaultMigrateConfig()
	return &cli.Command{
		Name:      "recover",
		Usage:     "take over a post-copy whose phaul migrate died",
		UsageText: "phaul recover --work-dir DIR [--to HOST:PORT] [--tls-dir DIR] ID",
		Description: "The destination of a post-copy (or hybrid) migration runs the tree and waits\n" +
			"--postcopy-recover-timeout for pages that only the source's frozen copy holds. If the\n" +
			"phaul migrate serving them died, phaul recover (on the source host, with the migrate's\n" +
			"--work-dir) reconnects, serves them from that copy, and kills the copy once the\n" +
			"destination has every page. A destination that never committed says so: the source's\n" +
			"copy then runs on. The destination and TLS dir default to what the migrate recorded.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "work-dir", Value: def.WorkDir, Usage: "the work dir of the phaul migrate that died"},
			&cli.StringFlag{Name: "to", Usage: "destination HOST:PORT (default: the migrate's)"},
			&cli.StringFlag{Name: "tls-dir", Usage: "ca.crt, node.crt, node.key (default: the migrate's)"},
			&cli.DurationFlag{Name: "postcopy-recover-timeout", Value: def.PostcopyRecoverTimeout, Usage: "how long to keep dialling the destination"},
			&cli.StringFlag{Name: "stats-json", Usage: "append one JSON object describing the take-over to FILE"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit("usage: phaul recover --work-dir DIR [--to HOST:PORT] [--tls-dir DIR] ID", 2)
			}
			cfg := phaul.RecoverConfig{WorkDir: c.String("work-dir"), ID: c.Args().First(), To: c.String("to"),
				TLSDir: c.String("tls-dir"), PostcopyRecoverTimeout: c.Duration("postcopy-recover-timeout"),
				Transport: def.Transport, Logger: newLogger(c)}
			cfg.Transport.Logger = cfg.Logger
			stats, err := phaul.Recover(c.Context, cfg)
			if path := c.String("stats-json"); path != "" && stats != nil {
				if werr := stats.AppendJSONFile(path); werr != nil {
					cfg.Logger.Error("write stats", "err", werr)
				}
			}
			switch {
			case err == nil:
				fmt.Fprintf(os.Stderr, "migration %s: post-copy taken over and done; the source's copy is gone\n", cfg.ID)
				if pc := stats.Postcopy; pc != nil {
					fmt.Fprintf(os.Stderr, "post-copy: %d pages fetched (%d on fault) after the take-over\n",
						pc.ServedFaultPages+pc.ServedFillPages, pc.ServedFaultPages)
				}
				return nil
			case errors.Is(err, phaul.ErrInDoubt):
				return cli.Exit(err.Error(), exitInDoubt)
			default:
				return cli.Exit(err.Error(), exitFailed)
			}
		},
	}
}

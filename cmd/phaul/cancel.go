package main

import (
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/phaul"
)

func cancelCommand() *cli.Command {
	return &cli.Command{
		Name:      "cancel",
		Usage:     "roll back a migration in progress (before its COMMIT)",
		UsageText: "phaul cancel --work-dir DIR [--timeout D] ID",
		Description: "Asks the phaul migrate that drives migration ID (found in the journal of its work dir)\n" +
			"to roll back, as SIGINT or SIGTERM to it would: before COMMIT the workload runs on at the\n" +
			"source and the destination drops its copy; from COMMIT on the destination's copy may run\n" +
			"and the cancel is refused. Exits 0 once the migration rolled back.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "work-dir", Value: phaul.DefaultMigrateConfig().WorkDir, Usage: "the work dir of the phaul migrate"},
			&cli.DurationFlag{Name: "timeout", Value: time.Minute, Usage: "how long to wait for the rollback"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return cli.Exit("usage: phaul cancel --work-dir DIR [--timeout D] ID", 2)
			}
			id := c.Args().First()
			last, runs, err := phaul.Cancel(c.String("work-dir"), id, c.Duration("timeout"))
			if err != nil {
				return cli.Exit(err.Error(), 1)
			}
			if !runs || last == phaul.PhaseDone {
				return cli.Exit(fmt.Sprintf("migration %s ended at %s; the source's copy no longer runs", id, last), 1)
			}
			fmt.Fprintf(c.App.Writer, "migration %s canceled (at %s): the workload runs on the source\n", id, last)
			return nil
		},
	}
}

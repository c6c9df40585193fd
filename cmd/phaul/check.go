package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/phaul"
)

func checkCommand() *cli.Command {
	return &cli.Command{
		Name:      "check",
		Usage:     "report whether this host can take part in a migration",
		UsageText: "phaul check [--json] [--criu PATH]",
		Description: "Probes CRIU and the kernel features phaul and CRIU use, one line each.\n" +
			"Exits 1 when a required item is missing.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
			// Also a global flag; repeated here so that `phaul check --criu X`
			// parses (urfave/cli v2 parses a subcommand's arguments with its
			// own flags only).
			criuFlag(),
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return cli.Exit("usage: phaul check [--json] [--criu PATH]", 2)
			}
			cfg := phaul.CheckConfig{CRIUPath: stringFlag(c, "criu"), Logger: newLogger(c)}
			report, err := phaul.Check(c.Context, cfg)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				err = writeCheckJSON(c.App.Writer, report)
			} else {
				err = writeCheckText(c.App.Writer, report)
			}
			if err != nil {
				return fmt.Errorf("write report: %w", err)
			}
			if !report.OK() {
				return cli.Exit("this host cannot migrate: missing "+strings.Join(report.Missing(), ", "), 1)
			}
			return nil
		},
	}
}

func writeCheckJSON(w io.Writer, r *phaul.CheckReport) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// writeCheckText prints a header, then feature, yes/no and detail in aligned
// columns, then a verdict naming the missing required items.
func writeCheckText(w io.Writer, r *phaul.CheckReport) error {
	criu := r.CRIUVersion
	if criu == "" {
		criu = "none"
	}
	if _, err := fmt.Fprintf(w, "host %s, kernel %s, criu %s\n\n", r.Host, r.Kernel, criu); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, it := range r.Items {
		answer := "yes"
		if !it.Available {
			answer = "no"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", it.Feature, answer, it.Detail)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	verdict := "OK: every required item is available"
	if !r.OK() {
		verdict = "NOT OK: required item missing: " + strings.Join(r.Missing(), ", ")
	}
	_, err := fmt.Fprintf(w, "\n%s\n", verdict)
	return err
}

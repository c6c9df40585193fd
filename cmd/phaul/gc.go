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

func gcCommand() *cli.Command {
	return &cli.Command{
		Name:      "gc",
		Usage:     "find and remove what unfinished migrations left on this host",
		UsageText: "phaul gc (--work-dir DIR | --images-dir DIR)... [--show] [--json] [--resolved ID[=source|destination]]...",
		Description: "Reads the journal of a work dir (phaul migrate's or phaul serve's) and resolves each\n" +
			"migration whose phaul is gone the safe way: a source tree CRIU still holds for a\n" +
			"migration that never committed resumes; one whose destination has run is killed;\n" +
			"CRIU's network lock, images, phaul's cgroups and the journal entry go. A migration\n" +
			"whose phaul runs is not touched, nor one in doubt until --resolved names it, nor\n" +
			"anything no entry names. Exits 1 when something is left (or, with --show, found).",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "work-dir", Usage: "the work dir phaul migrate or phaul serve used"},
			&cli.StringSliceFlag{Name: "images-dir", Usage: "the images `DIR` of a dump phaul did not drive (criu dump -D) that will never be restored: its link remaps and network lock go (repeatable)"},
			&cli.BoolFlag{Name: "show", Usage: "list what is left over and why; remove nothing"},
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
			&cli.StringSliceFlag{Name: "resolved", Usage: "a migration in doubt the operator has resolved: `ID=source` (the source's copy runs: a tree CRIU holds resumes), ID=destination (a held source tree is killed), or bare ID (copies resolved by hand); repeatable"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 || (c.String("work-dir") == "" && len(c.StringSlice("images-dir")) == 0) {
				return cli.Exit("usage: phaul gc (--work-dir DIR | --images-dir DIR)... [--show] [--json] [--resolved ID[=source|destination]]...", 2)
			}
			resolved := map[string]string{}
			for _, r := range c.StringSlice("resolved") {
				id, winner, _ := strings.Cut(r, "=")
				if winner != "" && winner != "source" && winner != "destination" {
					return cli.Exit("--resolved "+r+": want ID, ID=source or ID=destination", 2)
				}
				resolved[id] = winner
			}
			rep, err := phaul.GC(c.String("work-dir"), phaul.GCOptions{Apply: !c.Bool("show"),
				Resolved: resolved, ImagesDirs: c.StringSlice("images-dir"), Logger: newLogger(c)})
			if err != nil {
				return err
			}
			if c.Bool("json") {
				enc := json.NewEncoder(c.App.Writer)
				enc.SetIndent("", "  ")
				err = enc.Encode(rep)
			} else {
				err = writeGCText(c.App.Writer, rep, c.Bool("show"))
			}
			if err != nil {
				return fmt.Errorf("write report: %w", err)
			}
			for _, l := range rep.Leftovers {
				if !l.Done {
					return cli.Exit("", 1)
				}
			}
			return nil
		},
	}
}

// writeGCText prints one line per leftover: migration, kind, what, and
// what gc did (or would do, or why it left it).
func writeGCText(w io.Writer, rep phaul.GCReport, show bool) error {
	for _, b := range rep.Busy {
		fmt.Fprintf(w, "busy: %s\n", b)
	}
	if len(rep.Leftovers) == 0 {
		_, err := fmt.Fprintf(w, "nothing left over in %s\n", strings.Join(append([]string{rep.WorkDir}, rep.ImagesDirs...), " "))
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "MIGRATION\tROLE\tPHASE\tKIND\tWHAT\tSTATUS\tWHY")
	for _, l := range rep.Leftovers {
		status := "left"
		switch {
		case l.Err != "":
			status = "failed to " + l.Action + ": " + l.Err
		case l.Done:
			status = "done: " + l.Action
		case l.Action != "" && show:
			status = "would " + l.Action
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", dash(l.Migration), l.Role, dash(l.Phase), l.Kind, l.What, status, l.Why)
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/phaul"
)

// Exit codes of migrate.
const (
	exitFailed  = 1 // the workload still runs on the source
	exitUsage   = 2
	exitInDoubt = 3 // the source copy is gone; the destination did not confirm
)

func migrateCommand() *cli.Command {
	def := phaul.DefaultMigrateConfig()
	return &cli.Command{
		Name:      "migrate",
		Usage:     "move a running process tree to a phaul serve destination",
		UsageText: "phaul migrate --to HOST:PORT --tls-dir DIR [--mode cold] [--work-dir DIR] [--stats-json FILE] [CRIU options] PID",
		Flags: []cli.Flag{
			criuFlag(),
			&cli.StringFlag{Name: "to", Required: true, Usage: "destination HOST:PORT; its certificate must name HOST"},
			&cli.StringFlag{Name: "tls-dir", Required: true, Usage: "ca.crt, node.crt, node.key (from phaul certs); must not hold ca.key"},
			&cli.StringFlag{Name: "mode", Value: string(def.Mode), Usage: "precopy (memory moves in rounds while the tree runs, then the rest inside the freeze), hybrid (rounds, then the tree resumes on the destination and the rest follows), postcopy (the tree resumes on the destination at once; its memory follows, faulted pages first) or cold (freeze, then move everything)"},
			&cli.StringFlag{Name: "tracker", Value: def.Tracker, Usage: "pre-copy dirty-page tracker: auto, uffd-wp, soft-dirty, hash (phaul check says which work here)"},
			&cli.StringFlag{Name: "final-dump", Value: def.FinalDump, Usage: "pre-copy's freeze: lazy (CRIU dumps without copying memory; phaul reads the last dirty pages from the held tree) or full"},
			&cli.DurationFlag{Name: "downtime-target", Value: def.DowntimeTarget, Usage: "pre-copy: freeze once the expected downtime fits this"},
			&cli.DurationFlag{Name: "downtime-floor", Value: def.DowntimeFloor, Usage: "pre-copy: fixed part of the downtime floor (CRIU's dump and restore and the commit, whatever the memory; the memory part is measured on the destination)"},
			&cli.IntFlag{Name: "max-rounds", Value: def.MaxRounds, Usage: "pre-copy: freeze after this many rounds at the latest"},
			&cli.DurationFlag{Name: "postcopy-recover-timeout", Value: def.PostcopyRecoverTimeout, Usage: "post-copy and hybrid: after the destination resumed, how long to keep the frozen source copy and try to reconnect when the connection is lost"},
			&cli.IntFlag{Name: "hybrid-rounds", Value: def.HybridRounds, Usage: "hybrid: pre-copy rounds at most before the freeze (fewer once the dirty set stops shrinking)"},
			&cli.BoolFlag{Name: "prefault", Value: def.Prefault, Usage: "pre-copy: before the freeze, have the destination fill and free as much memory as the tree holds, so that the restore reuses memory instead of touching it first (--prefault=false to skip)"},
			&cli.BoolFlag{Name: "auto-converge", Usage: "pre-copy: throttle the tree's CPU (a cgroup v1 cpu group phaul creates) while it dirties memory faster than half the link carries, 20% first, then 10% more each time"},
			&cli.StringFlag{Name: "work-dir", Value: def.WorkDir, Usage: "where the source writes images (removed afterwards)"},
			&cli.StringFlag{Name: "stats-json", Usage: "append one JSON object describing the migration to FILE"},
			&cli.StringFlag{Name: "compress", Value: "auto", Usage: "zstd on the page stream: auto (on when the link is slower than the compressor on this data), on, off"},
			&cli.IntFlag{Name: "page-streams", Value: def.PageStreams, Usage: "streams the pages are spread over, compressed and written in parallel (1-16)"},
			&cli.BoolFlag{Name: "tcp-established", Usage: "CRIU: migrate established TCP connections"},
			&cli.BoolFlag{Name: "file-locks", Usage: "CRIU: migrate file locks"},
			&cli.BoolFlag{Name: "ext-unix-sk", Usage: "CRIU: allow unix sockets connected to processes outside the tree"},
			&cli.BoolFlag{Name: "shell-job", Usage: "CRIU: the tree belongs to a shell session or terminal outside it"},
			&cli.BoolFlag{Name: "link-remap", Usage: "CRIU: hard-link open but unlinked files so they can be restored"},
			&cli.StringFlag{Name: "ghost-limit", Usage: "CRIU: largest unlinked file to carry in the images (e.g. 16M)"},
			&cli.StringFlag{Name: "manage-cgroups", Usage: "CRIU: ignore (default), none, props, soft, full or strict; bare (no value), as CRIU takes it: soft"},
		},
		Action: func(c *cli.Context) error {
			usage := "usage: phaul migrate --to HOST:PORT --tls-dir DIR PID"
			if c.NArg() != 1 {
				return cli.Exit(usage, exitUsage)
			}
			pid, err := strconv.Atoi(c.Args().First())
			if err != nil || pid <= 0 {
				return cli.Exit(fmt.Sprintf("pid %q: not a process id; %s", c.Args().First(), usage), exitUsage)
			}
			mode, err := phaul.ParseMode(c.String("mode"))
			if err != nil {
				return cli.Exit(err.Error(), exitUsage)
			}
			cfg := phaul.DefaultMigrateConfig()
			cfg.To, cfg.TLSDir, cfg.Mode, cfg.PID = c.String("to"), c.String("tls-dir"), mode, pid
			cfg.WorkDir = c.String("work-dir")
			cfg.CRIUPath = stringFlag(c, "criu")
			cfg.Compress = c.String("compress")
			cfg.PageStreams = c.Int("page-streams")
			cfg.Tracker = c.String("tracker")
			cfg.FinalDump = c.String("final-dump")
			cfg.DowntimeTarget = c.Duration("downtime-target")
			cfg.DowntimeFloor = c.Duration("downtime-floor")
			cfg.MaxRounds = c.Int("max-rounds")
			cfg.HybridRounds = c.Int("hybrid-rounds")
			cfg.PostcopyRecoverTimeout = c.Duration("postcopy-recover-timeout")
			cfg.AutoConverge = c.Bool("auto-converge")
			cfg.Prefault = c.Bool("prefault")
			cfg.CRIU = criu.Options{
				TCPEstablished: c.Bool("tcp-established"),
				FileLocks:      c.Bool("file-locks"),
				ExtUnixSk:      c.Bool("ext-unix-sk"),
				ShellJob:       c.Bool("shell-job"),
				LinkRemap:      c.Bool("link-remap"),
				ManageCgroups:  c.String("manage-cgroups"),
			}
			if s := c.String("ghost-limit"); s != "" {
				n, err := parseSize(s)
				if err != nil {
					return cli.Exit("--ghost-limit: "+err.Error(), exitUsage)
				}
				cfg.CRIU.GhostLimit = n
			}
			cfg.Logger = newLogger(c)
			cfg.Transport.Logger = cfg.Logger
			bar := newProgressBar(os.Stderr)
			if bar != nil {
				cfg.Progress = bar.update
			}
			stats, err := phaul.Migrate(c.Context, cfg)
			if bar != nil {
				bar.done()
			}
			if path := c.String("stats-json"); path != "" {
				if werr := stats.AppendJSONFile(path); werr != nil {
					cfg.Logger.Error("write stats", "err", werr)
				}
			}
			switch {
			case err == nil:
				fmt.Fprintf(os.Stderr, "migrated pid %d to %s: destination pid %d, downtime %.1f ms, %d image bytes, total %.0f ms\n",
					pid, cfg.To, stats.DestPID, stats.DowntimeMS, stats.BytesImages, stats.TotalMS)
				if pc := stats.Postcopy; pc != nil {
					fmt.Fprintf(os.Stderr, "post-copy: %.0f ms after the resume until every page was there; %d pages fetched (%d on fault), fault p99 %.2f ms\n",
						pc.MS, pc.ServedFaultPages+pc.ServedFillPages, pc.ServedFaultPages, pc.FaultP99MS)
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

// parseSize reads "4096", "64K", "16M", "1G" (powers of 1024).
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	t := strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B")
	switch {
	case strings.HasSuffix(t, "K"):
		mult, t = 1<<10, strings.TrimSuffix(t, "K")
	case strings.HasSuffix(t, "M"):
		mult, t = 1<<20, strings.TrimSuffix(t, "M")
	case strings.HasSuffix(t, "G"):
		mult, t = 1<<30, strings.TrimSuffix(t, "G")
	}
	n, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M or G suffix", s)
	}
	if n > (1<<64-1)/mult {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return n * mult, nil
}

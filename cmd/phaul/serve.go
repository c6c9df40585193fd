package main

import (
	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/phaul"
)

func serveCommand() *cli.Command {
	def := phaul.DefaultServeConfig()
	return &cli.Command{
		Name:      "serve",
		Usage:     "receive and restore migrations (destination service)",
		UsageText: "phaul serve --listen ADDR:PORT --work-dir DIR --tls-dir DIR (--allow-peer NAME... | --allow-any-peer) [--deny-list FILE]",
		Flags: []cli.Flag{
			criuFlag(),
			&cli.StringFlag{Name: "listen", Required: true, Usage: "address to listen on, ADDR:PORT"},
			&cli.StringFlag{Name: "work-dir", Value: def.WorkDir, Usage: "directory this service owns: one subdirectory per migration"},
			&cli.StringFlag{Name: "tls-dir", Required: true, Usage: "ca.crt, node.crt, node.key (from phaul certs); must not hold ca.key"},
			&cli.StringSliceFlag{Name: "allow-peer", Usage: "a source this service admits: a DNS name or IP its certificate names (repeatable); one of --allow-peer, --allow-any-peer is required"},
			&cli.BoolFlag{Name: "allow-any-peer", Usage: "admit every certificate of the CA as a source (each one can then have trees restored here as root)"},
			&cli.StringFlag{Name: "deny-list", Usage: "file of revoked certificate serials (hex, one a line, # comments), read again whenever it changes; unreadable, it refuses every peer"},
			&cli.StringFlag{Name: "restore-policy", Usage: "JSON file (this user's, not writable by others) saying what a source may have restored: criu_options, host_namespaces, allow_root, allow_capabilities, read_paths, write_paths; without it: unprivileged trees only, no link-remap or manage-cgroups (README)"},
			&cli.Uint64Flag{Name: "memory-budget-mib", Usage: "memory the prefaults of all migrations may hold at once (default: half of what is available)"},
			&cli.Uint64Flag{Name: "disk-budget-mib", Usage: "bytes all migrations' directories may hold (default: no budget)"},
			&cli.Uint64Flag{Name: "min-free-disk-mib", Value: def.MinFreeDisk >> 20, Usage: "free space the work dir's filesystem must keep; a migration is refused or aborted below it"},
			&cli.DurationFlag{Name: "max-migration-time", Value: def.MaxMigrationTime, Usage: "wall-clock limit from a migration's hello until its restore is prepared; past it the migration is aborted (the source's copy runs on)"},
			&cli.DurationFlag{Name: "hello-timeout", Value: def.HelloTimeout, Usage: "how long an authenticated session may take to open its control stream and say hello; then it is dropped"},
			&cli.IntFlag{Name: "max-migrations", Value: def.MaxMigrations, Usage: "migrations in progress at once"},
			&cli.IntFlag{Name: "max-sessions", Value: def.MaxSessions, Usage: "authenticated sessions open at once, of all sources; one more is closed at once"},
			&cli.IntFlag{Name: "max-sessions-per-peer", Value: def.MaxSessionsPerPeer, Usage: "authenticated sessions of one source (certificate) open at once; one more is closed at once"},
			&cli.IntFlag{Name: "max-migrations-per-peer", Value: def.MaxMigrationsPerPeer, Usage: "migrations of one source (certificate) in progress at once"},
			&cli.IntFlag{Name: "max-in-doubt", Value: def.MaxInDoubt, Usage: "migrations left in doubt here before new ones are refused (resolve them with phaul gc --resolved)"},
			&cli.DurationFlag{Name: "restore-timeout", Value: def.RestoreTimeout, Usage: "kill a CRIU restore that takes longer and abort the migration"},
			&cli.DurationFlag{Name: "postcopy-recover-timeout", Value: def.PostcopyRecoverTimeout, Usage: "post-copy: how long to wait for a source whose connection was lost to reconnect (the restored tree's threads that touch a missing page wait meanwhile)"},
			&cli.DurationFlag{Name: "commit-wait", Value: def.CommitWait, Usage: "on shutdown, how long a prepared migration waits for COMMIT"},
			&cli.BoolFlag{Name: "lazy-restore", Value: def.LazyRestore, Usage: "restore without writing the memory the images mark lazy, so the freeze does not grow with it; phaul's lazy-pages daemon fills it once the tree runs (--lazy-restore=false: CRIU writes all memory inside the freeze; post-copy is lazy regardless)"},
			&cli.StringFlag{Name: "cgroup-parent", Value: def.CgroupParent, Usage: "cgroup (below the freezer v1 and cgroup v2 roots) that committed trees move to, unless --manage-cgroups puts them in their own"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return cli.Exit("usage: "+c.Command.UsageText, 2)
			}
			cfg := phaul.DefaultServeConfig()
			cfg.Listen = c.String("listen")
			cfg.WorkDir = c.String("work-dir")
			cfg.TLSDir = c.String("tls-dir")
			cfg.AllowPeers, cfg.AllowAnyPeer, cfg.DenyList = c.StringSlice("allow-peer"), c.Bool("allow-any-peer"), c.String("deny-list")
			cfg.RestorePolicy = c.String("restore-policy")
			cfg.CRIUPath = stringFlag(c, "criu")
			cfg.MaxMigrations = c.Int("max-migrations")
			cfg.MaxMigrationsPerPeer, cfg.MaxInDoubt = c.Int("max-migrations-per-peer"), c.Int("max-in-doubt")
			cfg.MaxSessionsPerPeer, cfg.MaxSessions = c.Int("max-sessions-per-peer"), c.Int("max-sessions")
			cfg.HelloTimeout = c.Duration("hello-timeout")
			cfg.MaxMigrationTime = c.Duration("max-migration-time")
			cfg.MemoryBudget = c.Uint64("memory-budget-mib") << 20
			cfg.DiskBudget = c.Uint64("disk-budget-mib") << 20
			cfg.MinFreeDisk = c.Uint64("min-free-disk-mib") << 20
			cfg.CommitWait = c.Duration("commit-wait")
			cfg.PostcopyRecoverTimeout = c.Duration("postcopy-recover-timeout")
			cfg.CgroupParent = c.String("cgroup-parent")
			cfg.LazyRestore = c.Bool("lazy-restore")
			cfg.RestoreTimeout = c.Duration("restore-timeout")
			cfg.Logger = newLogger(c)
			cfg.Transport.Logger = cfg.Logger
			return phaul.Serve(c.Context, cfg)
		},
	}
}

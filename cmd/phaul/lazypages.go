package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/phaul"
)

// lazyPagesCommand is the lazy-pages helper phaul serve starts for each
// lazy restore (phaul/lazyhelper.go); not for operators.
func lazyPagesCommand() *cli.Command {
	return &cli.Command{
		Name:   "lazy-pages",
		Usage:  "serve one restore's lazy pages (started by phaul serve)",
		Hidden: true,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "the restore's work dir"},
			&cli.StringFlag{Name: "images-dir", Required: true, Usage: "its images"},
			&cli.BoolFlag{Name: "postcopy", Usage: "pages without content are at the source"},
			&cli.DurationFlag{Name: "recover-timeout", Usage: "how long fetches wait for a service to relay a stream"},
		},
		Action: func(c *cli.Context) error {
			// fd 3: where phaul serve waits for "ok" (ExtraFiles).
			ready := os.NewFile(3, "ready")
			err := phaul.RunLazyHelper(c.Context, phaul.LazyHelperConfig{Dir: c.String("dir"), ImagesDir: c.String("images-dir"),
				Postcopy: c.Bool("postcopy"), RecoverTimeout: c.Duration("recover-timeout"), Logger: newLogger(c), Ready: ready})
			if err != nil {
				return cli.Exit(err.Error(), exitFailed)
			}
			return nil
		},
	}
}

package main

import (
	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/pageserver"
)

// pageServerCommand is "phaul page-server": a drop-in for criu page-server
// that keeps the pages in phaul's page store.
func pageServerCommand() *cli.Command {
	def := pageserver.DefaultRunConfig()
	const usage = "phaul page-server --listen ADDR:PORT --images-dir DIR [--tls-dir DIR --allow-peer NAME|--allow-any-peer [--deny-list FILE]] [--keep] [--no-fsync]"
	return &cli.Command{
		Name:      "page-server",
		Usage:     "receive pages from criu dump --page-server (drop-in for criu page-server)",
		UsageText: usage,
		Description: "Serves CRIU 4.2's page-server protocol and writes pagemap-*.img and pages-*.img\n" +
			"into --images-dir when the client sends CLOSE, then exits 0. With --keep it serves\n" +
			"on until SIGINT or SIGTERM; after the first CLOSE it only answers GETs (criu\n" +
			"lazy-pages --page-server). Without --tls-dir it listens on loopback only; with it,\n" +
			"clients (criu dump --tls --tls-cacert ca.crt --tls-cert node.crt --tls-key node.key,\n" +
			"absolute paths) must present a certificate from ca.crt. The images are fsynced before\n" +
			"CLOSE is answered; --no-fsync skips that, as criu page-server does.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "listen", Required: true, Usage: "address to listen on, ADDR:PORT (loopback unless --tls-dir)"},
			&cli.StringFlag{Name: "images-dir", Required: true, Usage: "directory for pagemap-*.img and pages-*.img (may be criu's -D)"},
			&cli.StringFlag{Name: "tls-dir", Usage: "ca.crt, node.crt, node.key (from phaul certs); must not hold ca.key"},
			&cli.StringSliceFlag{Name: "allow-peer", Usage: "with --tls-dir: a client certificate's DNS name or IP the server admits (repeatable)"},
			&cli.BoolFlag{Name: "allow-any-peer", Usage: "with --tls-dir: admit every certificate of the CA"},
			&cli.StringFlag{Name: "deny-list", Usage: "with --tls-dir: FILE of revoked serials (one a line), reread when it changes"},
			&cli.BoolFlag{Name: "keep", Usage: "keep serving sessions after the first CLOSE"},
			&cli.BoolFlag{Name: "no-fsync", Usage: "answer CLOSE without fsyncing the images (like criu page-server; a host crash may lose them)"},
			&cli.DurationFlag{Name: "idle-timeout", Value: def.Server.IdleTimeout, Usage: "drop a session whose peer sends nothing for this long (0: never)"},
		},
		Action: func(c *cli.Context) error {
			if c.NArg() != 0 {
				return cli.Exit("usage: "+usage, 2)
			}
			cfg := pageserver.DefaultRunConfig()
			cfg.Listen = c.String("listen")
			cfg.ImagesDir = c.String("images-dir")
			cfg.TLSDir = c.String("tls-dir")
			if cfg.TLSDir != "" || c.IsSet("allow-peer") || c.Bool("allow-any-peer") {
				cfg.Peers = &transport.PeerPolicy{Allow: c.StringSlice("allow-peer"), AnyPeer: c.Bool("allow-any-peer"), DenyFile: c.String("deny-list")}
				if cfg.TLSDir != "" && !c.IsSet("allow-peer") && !c.Bool("allow-any-peer") {
					cfg.Peers = nil // Validate says what is missing
				}
			}
			cfg.Keep = c.Bool("keep")
			cfg.NoSync = c.Bool("no-fsync")
			cfg.Server.IdleTimeout = c.Duration("idle-timeout")
			cfg.Logger = newLogger(c)
			return pageserver.Run(c.Context, cfg)
		},
	}
}

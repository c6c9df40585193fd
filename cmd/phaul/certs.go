package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/core/pki"
)

func certsCommand() *cli.Command {
	return &cli.Command{
		Name:      "certs",
		Usage:     "create a CA (if none) and a node certificate for the named hosts",
		UsageText: "phaul certs --ca-dir CADIR --out DIR --host NAME_OR_IP [--host ...]",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "ca-dir", Required: true, Usage: "the CA's directory (ca.crt, ca.key); created if empty"},
			&cli.StringFlag{Name: "out", Required: true, Usage: "where ca.crt, node.crt and node.key go: a node's --tls-dir"},
			&cli.StringSliceFlag{Name: "host", Required: true, Usage: "DNS name or IP the node is reached by (repeat)"},
		},
		Action: func(c *cli.Context) error {
			caDir, out, hosts := c.String("ca-dir"), c.String("out"), c.StringSlice("host")
			if c.NArg() != 0 {
				return cli.Exit("usage: phaul certs --ca-dir CADIR --out DIR --host NAME_OR_IP", 2)
			}
			same, err := sameDir(caDir, out)
			if err != nil {
				return err
			}
			if same {
				return cli.Exit("--out must not be the CA directory: a node must never hold ca.key", 2)
			}
			ca, err := pki.LoadCA(caDir)
			if errors.Is(err, fs.ErrNotExist) {
				ca, err = pki.CreateCA(caDir)
				if err == nil {
					fmt.Fprintf(os.Stderr, "created CA in %s\n", caDir)
				}
			}
			if err != nil {
				return err
			}
			cert, err := pki.IssueNode(ca, hosts, out)
			if err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "wrote %s: ca.crt, node.crt (%v, valid until %s), node.key\n",
				out, hosts, cert.NotAfter.Format("2006-01-02"))
			return nil
		},
	}
}

// sameDir reports whether a and b name the same directory; b need not exist.
func sameDir(a, b string) (bool, error) {
	aa, err := filepath.Abs(a)
	if err != nil {
		return false, err
	}
	bb, err := filepath.Abs(b)
	if err != nil {
		return false, err
	}
	if aa == bb {
		return true, nil
	}
	sa, errA := os.Stat(aa)
	sb, errB := os.Stat(bb)
	return errA == nil && errB == nil && os.SameFile(sa, sb), nil
}

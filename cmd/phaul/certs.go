package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/phaul/phaul/core/pki"
	"github.com/phaul/phaul/core/transport"
)

// certsCommand is "phaul certs": it creates the CA if there is none and
// issues one node's certificate into that node's tls-dir.
func certsCommand() *cli.Command {
	return &cli.Command{
		Name:      "certs",
		Usage:     "create the CA if needed and issue a node certificate",
		UsageText: "phaul certs --ca-dir CADIR --out DIR --host NAME_OR_IP [--host NAME_OR_IP ...] [--role source|destination|both] [--days N]",
		Description: "The CA (ca.crt, ca.key) lives in --ca-dir and is created there on first use.\n" +
			"--out receives ca.crt, node.crt and node.key: copy it to the node as its tls-dir.\n" +
			"ca.key never goes into --out; keep it off the nodes.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "ca-dir", Usage: "directory of the CA; created with a new CA if empty", Required: true},
			&cli.StringFlag{Name: "out", Usage: "node `DIR` to write ca.crt, node.crt, node.key into", Required: true},
			&cli.StringSliceFlag{Name: "host", Usage: "DNS name or IP the node is reached by (repeatable); a destination's --allow-peer names a source by one of these", Required: true},
			&cli.StringFlag{Name: "role", Value: string(pki.RoleBoth), Usage: "source (may only dial: phaul migrate), destination (may only listen: phaul serve, phaul page-server) or both"},
			&cli.IntFlag{Name: "days", Value: int(pki.NodeValidity / (24 * time.Hour)), Usage: "days the certificate is valid"},
		},
		Action: func(c *cli.Context) error {
			caDir, out, hosts := c.String("ca-dir"), c.String("out"), c.StringSlice("host")
			if c.NArg() != 0 {
				return cli.Exit("usage: "+c.Command.UsageText, 2)
			}
			if same, err := sameDir(caDir, out); err != nil {
				return err
			} else if same {
				return cli.Exit("certs: --out must not be --ca-dir: a node's tls-dir must never hold ca.key", 2)
			}
			ca, created, err := pki.LoadOrCreateCA(caDir)
			if err != nil {
				return err
			}
			cert, err := pki.IssueNodeWith(ca, pki.NodeOptions{Hosts: hosts, Role: pki.Role(c.String("role")),
				Validity: time.Duration(c.Int("days")) * 24 * time.Hour}, out)
			if err != nil {
				return err
			}
			w := c.App.Writer
			if created {
				fmt.Fprintf(w, "created CA %q: %s, %s (keep ca.key off the nodes)\n", ca.Cert.Subject.CommonName,
					filepath.Join(caDir, pki.CACertFile), filepath.Join(caDir, pki.CAKeyFile))
			} else {
				fmt.Fprintf(w, "using CA %q in %s\n", ca.Cert.Subject.CommonName, caDir)
			}
			fmt.Fprintf(w, "wrote %s, %s, %s\n", filepath.Join(out, pki.CACertFile),
				filepath.Join(out, pki.NodeCertFile), filepath.Join(out, pki.NodeKeyFile))
			fmt.Fprintf(w, "node certificate for %s, role %s, serial %s, valid until %s\n",
				strings.Join(hosts, ", "), c.String("role"), transport.SerialString(cert.SerialNumber), cert.NotAfter.UTC().Format("2006-01-02"))
			return nil
		},
	}
}

// sameDir reports whether a and b name the same directory, by path or, if
// both exist, by identity (symlinks, bind mounts).
func sameDir(a, b string) (bool, error) {
	absA, err := filepath.Abs(a)
	if err != nil {
		return false, err
	}
	absB, err := filepath.Abs(b)
	if err != nil {
		return false, err
	}
	if absA == absB {
		return true, nil
	}
	infoA, errA := os.Stat(a)
	infoB, errB := os.Stat(b)
	return errA == nil && errB == nil && os.SameFile(infoA, infoB), nil
}

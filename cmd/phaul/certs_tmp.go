package main

import "github.com/urfave/cli/v2"

func certsCommand() *cli.Command { return &cli.Command{Name: "certs"} }

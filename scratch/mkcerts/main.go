package main

import (
	"fmt"
	"os"

	"github.com/phaul/phaul/core/pki"
)

func main() {
	ca, err := pki.CreateCA(os.Args[1])
	if err != nil {
		ca, err = pki.LoadCA(os.Args[1])
	}
	if err != nil {
		panic(err)
	}
	_, err = pki.IssueNode(ca, os.Args[3:], os.Args[2])
	fmt.Println(err)
}

package phaul

import (
	"regexp"

	"github.com/phaul/phaul/core/linux"
)

// migrationID is what newID makes: a migration's directory and journal
// name.
var migrationID = regexp.MustCompile(`^[0-9a-f]{16}$`)

// privateDir is linux.PrivateDir: work dirs another user could write
// into or swap are refused.
func privateDir(dir string) error { return linux.PrivateDir(dir) }

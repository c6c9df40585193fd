package phaul

import (
	"fmt"
	"os"
	"regexp"
	"syscall"
)

// migrationID is what newID makes: a migration's directory and journal
// name.
var migrationID = regexp.MustCompile(`^[0-9a-f]{16}$`)

// privateDir makes dir (and missing parents) with mode 0700, and refuses
// one that another user could write into or swap: it must be a real
// directory (not a symlink) of this user that neither group nor others
// may read, write or search. Images written there are restored as root
// on the destination, and root follows paths inside it.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return fmt.Errorf("%s is a symlink: want a directory of its own", dir)
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory", dir)
	case !ok || int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s belongs to uid %d, not this user (%d): chown it, or choose another", dir, st.Uid, os.Geteuid())
	case fi.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("%s has mode %#o: group and others must have no access (chmod 700 %s)", dir, fi.Mode().Perm(), dir)
	}
	return nil
}

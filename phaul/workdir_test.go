package phaul

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPrivateDir: a work dir phaul makes is 0700 and accepted; one that
// group or others may enter, a planted symlink and another user's are
// refused (issue 12: a local user who owns the source's work dir could
// swap images restored as root on the destination).
func TestPrivateDir(t *testing.T) {
	base := t.TempDir()
	fresh := filepath.Join(base, "a", "work")
	if err := privateDir(fresh); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(fresh); fi.Mode().Perm() != 0o700 {
		t.Fatalf("made with mode %#o", fi.Mode().Perm())
	}
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o755)
	os.Chmod(open, 0o755)
	link := filepath.Join(base, "link")
	os.Symlink(fresh, link)
	cases := map[string]string{open: "mode", link: "symlink"}
	if os.Geteuid() == 0 {
		foreign := filepath.Join(base, "foreign")
		os.Mkdir(foreign, 0o700)
		if err := os.Chown(foreign, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		cases[foreign] = "uid 65534"
	}
	for dir, want := range cases {
		if err := privateDir(dir); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("privateDir(%s) = %v, want an error naming %q", dir, err, want)
		}
	}
}

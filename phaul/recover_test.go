package phaul

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRecoverSource: entries of dead owners are undone (images removed,
// entry removed); an entry in doubt, one of a live owner and one naming
// images outside the work dir stay.
func TestRecoverSource(t *testing.T) {
	work := t.TempDir()
	jdir := JournalDir(work)
	if err := os.MkdirAll(jdir, 0o700); err != nil {
		t.Fatal(err)
	}
	outside := t.TempDir()
	write := func(e JournalEntry) string {
		b, _ := json.Marshal(e)
		p := entryPath(jdir, e.ID, e.Role)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	self, err := openJournal(jdir, "00000000000000a1", RoleSource, JournalEntry{Phase: PhaseRounds})
	if err != nil {
		t.Fatal(err)
	}
	images := filepath.Join(work, "00000000000000b2")
	os.MkdirAll(filepath.Join(images, "parent"), 0o700)
	dead := JournalEntry{ID: "00000000000000b2", Role: RoleSource, Phase: PhaseTransfer, Owner: 1 << 30, ImagesDir: images,
		Root: 1 << 30, NftTable: "CRIU-no-such-table-phaul-test"}
	deadPath := write(dead)
	doubt := write(JournalEntry{ID: "00000000000000c3", Role: RoleSource, Phase: PhaseInDoubt, Owner: 1 << 30})
	escape := write(JournalEntry{ID: "00000000000000d4", Role: RoleSource, Phase: PhaseDump, Owner: 1 << 30, ImagesDir: outside})
	dest := write(JournalEntry{ID: "00000000000000e5", Role: RoleDestination, Phase: PhaseRestore, Owner: 1 << 30})

	did := recoverSource(work, discardIfNil(nil))
	if len(did) != 2 || !strings.HasPrefix(did[0], dead.ID+" images:") || !strings.HasPrefix(did[1], dead.ID+" journal:") {
		t.Fatalf("recoverSource did %q, want %s's images and entry removed", did, dead.ID)
	}
	if _, err := os.Stat(images); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("images of the dead migration: %v, want removed", err)
	}
	if _, err := os.Stat(deadPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("entry of the dead migration: %v, want removed", err)
	}
	for name, p := range map[string]string{"in doubt": doubt, "images outside": escape, "destination's": dest, "live owner's": self.path} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s entry: %v, want it kept", name, err)
		}
	}
	if _, err := os.Stat(outside); err != nil {
		t.Errorf("a directory outside the work dir: %v, want untouched", err)
	}
}

package phaul

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestJournal(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "journal")
	j, err := openJournal(dir, "0123456789abcdef", RoleSource, JournalEntry{Phase: PhasePreflight, Mode: ModePostcopy, Root: 42})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.record(func(e *JournalEntry) { e.Phase, e.NftTable = PhasePrepared, "CRIU-x" }); err != nil {
		t.Fatal(err)
	}
	ents, err := ReadJournal(dir)
	if err != nil || len(ents) != 1 {
		t.Fatalf("ReadJournal = %+v, %v", ents, err)
	}
	e := ents[0]
	if e.ID != "0123456789abcdef" || e.Role != RoleSource || e.Phase != PhasePrepared || e.Mode != ModePostcopy ||
		e.Root != 42 || e.NftTable != "CRIU-x" || e.Owner != os.Getpid() || !e.OwnerAlive() {
		t.Fatalf("entry read back: %+v", e)
	}
	// An owner that is gone (or a reused pid: another start time).
	e.OwnerStart++
	if e.OwnerAlive() {
		t.Fatal("an owner with another start time is taken for alive")
	}
	if !strings.Contains(e.String(), "gone") {
		t.Fatalf("String() = %q, want it to say the owner is gone", e.String())
	}
	// No temporary files left; a foreign file is ignored; a broken entry
	// is an error naming it.
	os.WriteFile(filepath.Join(dir, "README"), []byte("x"), 0o600)
	names, _ := os.ReadDir(dir)
	if len(names) != 2 {
		t.Fatalf("journal dir holds %d files, want the entry and README", len(names))
	}
	bad := filepath.Join(dir, "fedcba9876543210.destination.json")
	os.WriteFile(bad, []byte("{"), 0o600)
	if _, err := ReadJournal(dir); err == nil || !strings.Contains(err.Error(), "fedcba9876543210") {
		t.Fatalf("ReadJournal with a broken entry = %v", err)
	}
	os.Remove(bad)
	if err := j.remove(); err != nil {
		t.Fatal(err)
	}
	if ents, err := ReadJournal(dir); err != nil || len(ents) != 0 {
		t.Fatalf("after remove: %+v, %v", ents, err)
	}
	if ents, err := ReadJournal(filepath.Join(dir, "missing")); err != nil || ents != nil {
		t.Fatalf("ReadJournal of a missing dir = %v, %v", ents, err)
	}
}

package pagestore

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// TestLevels: a spool that lost image order is committed as two levels
// with Config.Levels: the spool as it was when the order broke becomes
// parent/ (linked, not copied) and the top level holds only the pages that
// moved since. Whatever the layout, the images must resolve to exactly the
// newest copy of every page of the set.
func TestLevels(t *testing.T) {
	const base = 0x100000
	k := Key{Kind: KindTask, ID: 7}
	tests := []struct {
		name   string
		levels bool
		final  bool // a final set that leaves page 3 out
		// wantTop is how many present pages the top level's pages image
		// holds with levels; wantParent how many PE_PARENT pages.
		wantTop, wantParent uint64
	}{
		{name: "levels", levels: true, wantTop: 3, wantParent: 63},
		{name: "levels, final set", levels: true, final: true, wantTop: 3, wantParent: 62},
		{name: "copy", levels: false},
		{name: "copy, final set", levels: false, final: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "images")
			s := newTestStore(t, Config{Dir: dir, Levels: tt.levels})
			if _, err := s.Open(k); err != nil {
				t.Fatal(err)
			}
			want := map[uint64][]byte{} // vaddr: newest content
			add := func(vaddr uint64, data []byte) {
				t.Helper()
				n := uint64(len(data) / PageSize)
				if err := s.Add(k, vaddr, n, FlagPresent, data); err != nil {
					t.Fatal(err)
				}
				for i := range n {
					want[vaddr+i*PageSize] = data[i*PageSize : (i+1)*PageSize]
				}
			}
			add(base, pattern(64, 1))                    // round 1, in order
			add(base-0x10000, pattern(1, 2))             // a page below: the order breaks
			add(base+5*PageSize, pattern(1, 3))          // in place: the parent's slot
			add(base+7*PageSize, make([]byte, PageSize)) // data turned zero
			add(base+0x90000, pattern(1, 4))             // may reuse page 7's slot
			add(base+9*PageSize, pattern(1, 5))          // in place again
			if tt.final {
				if err := s.BeginFinal(); err != nil {
					t.Fatal(err)
				}
				for va := range want {
					if va == base+3*PageSize {
						continue
					}
					if err := s.Keep(k, va, 1); err != nil {
						t.Fatal(err)
					}
				}
				delete(want, base+3*PageSize)
				add(base+11*PageSize, pattern(1, 6)) // dirtied while frozen
			}
			if err := s.Commit(); err != nil {
				t.Fatal(err)
			}

			_, err := os.Stat(filepath.Join(dir, parentDir))
			if tt.levels != (err == nil) {
				t.Fatalf("parent level present: %v, want %v", err == nil, tt.levels)
			}
			sets := readImages(t, dir)
			got := sets[k].pagesOf()
			if len(got) != len(want) {
				t.Errorf("%d pages in the images, want %d", len(got), len(want))
			}
			for va, data := range want {
				if p, ok := got[va]; !ok || !bytes.Equal(p.data, data) {
					t.Errorf("page %#x: in images %v, content differs or missing", va, ok)
				}
			}
			if !tt.levels {
				return
			}
			var top, parent uint64
			for _, e := range sets[k].pm.Entries {
				switch {
				case e.Flags == FlagParent:
					parent += e.NrPages
				case e.Flags&FlagPresent != 0:
					top += e.NrPages
				}
			}
			if top != tt.wantTop || parent != tt.wantParent {
				t.Errorf("top level: %d present pages, %d PE_PARENT; want %d and %d", top, parent, tt.wantTop, tt.wantParent)
			}
		})
	}
}

// TestLevelsRefuseExistingParent: Commit never writes through a parent
// entry it did not make (CRIU's own parent link, say).
func TestLevelsRefuseExistingParent(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	k := Key{Kind: KindTask, ID: 1}
	s := newTestStore(t, Config{Dir: dir, Levels: true})
	if _, err := s.Open(k); err != nil {
		t.Fatal(err)
	}
	for _, va := range []uint64{0x20000, 0x10000} {
		if err := s.Add(k, va, 1, FlagPresent, pattern(1, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	elsewhere := t.TempDir()
	if err := os.Symlink(elsewhere, filepath.Join(dir, parentDir)); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); err == nil {
		t.Fatal("commit over an existing parent link succeeded")
	}
	if ents, _ := os.ReadDir(elsewhere); len(ents) != 0 {
		t.Fatalf("commit wrote %d files through the parent link", len(ents))
	}
}

// TestLevelsPartialAndFailure: a cut-short commit's staged parent level is
// reported by Partial, and a commit refused because a top-level name is
// taken leaves neither the parent level nor staged files, and the store
// commits both levels once the name is free.
func TestLevelsPartialAndFailure(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	staged := filepath.Join(stagingDir(dir), parentDir)
	if err := os.MkdirAll(staged, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(staged, "pages-1.img"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if left, err := Partial(dir); err != nil || len(left) != 1 || left[0] != filepath.Join(parentDir, "pages-1.img") {
		t.Fatalf("partial: %v, %v", left, err)
	}
	if err := os.RemoveAll(stagingDir(dir)); err != nil {
		t.Fatal(err)
	}

	k := Key{Kind: KindTask, ID: 1}
	s := newTestStore(t, Config{Dir: dir, Levels: true})
	if _, err := s.Open(k); err != nil {
		t.Fatal(err)
	}
	for _, va := range []uint64{0x20000, 0x10000} { // out of order: two levels
		if err := s.Add(k, va, 1, FlagPresent, pattern(1, 1)); err != nil {
			t.Fatal(err)
		}
	}
	// The top pagemap's name is taken.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, k.pagemapName()), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("commit over an existing pagemap: %v, want fs.ErrExist", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, parentDir)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("failed commit left the parent level: %v", err)
	}
	if left, err := Partial(dir); err != nil || len(left) != 0 {
		t.Fatalf("failed commit left staged files: %v, %v", left, err)
	}
	// Once the name is free the same store commits both levels.
	if err := os.Remove(filepath.Join(dir, k.pagemapName())); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, parentDir, k.pagemapName())); err != nil {
		t.Fatalf("parent level after the commit: %v", err)
	}
}

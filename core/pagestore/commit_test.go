package pagestore

import (
	"bytes"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	pmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/pagemap"
	"google.golang.org/protobuf/proto"
)

// TestCommitImageBytes decodes what Commit wrote with go-criu's protobuf
// types alone and pins the bytes of an entry to what CRIU 4.2 writes.
func TestCommitImageBytes(t *testing.T) {
	s := newTestStore(t, Config{})
	if err := s.Add(task, 0x1000, 2, FlagParent, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(task, 0x3000, 1, FlagPresent|FlagLazy, pattern(1, 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Open(task2); err != nil { // opened, no pages: an empty pagemap
		t.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(filepath.Join(s.cfg.Dir, "pagemap-1.img"))
	if err != nil {
		t.Fatal(err)
	}
	magics, recs := rawRecords(t, img)
	if magics != [2]uint32{0x54564319, 0x56084025} {
		t.Fatalf("magics %#x", magics)
	}
	if len(recs) != 3 {
		t.Fatalf("%d records, want head + 2 entries", len(recs))
	}
	var head pmimg.PagemapHead
	if err := proto.Unmarshal(recs[0], &head); err != nil || head.GetPagesId() != 1 {
		t.Fatalf("head %v: %v", &head, err)
	}
	// CRIU 4.2 wrote these bytes for {vaddr 0x1000, PE_PARENT, 2 pages}
	// and {vaddr 0x3000, PE_PRESENT|PE_LAZY, 1 page}: field 2
	// (compat_nr_pages) present and 0, the count in field 5.
	for i, want := range []string{"088020100020012802", "088060100020062801"} {
		if got := hex.EncodeToString(recs[i+1]); got != want {
			t.Errorf("entry %d: %s, want %s", i, got, want)
		}
		var pe pmimg.PagemapEntry
		if err := proto.Unmarshal(recs[i+1], &pe); err != nil {
			t.Fatal(err)
		}
		if pe.CompatNrPages == nil || pe.GetCompatNrPages() != 0 || pe.NrPages == nil || pe.InParent != nil || pe.Flags == nil {
			t.Errorf("entry %d: %v", i, &pe)
		}
	}
	pages, err := os.ReadFile(filepath.Join(s.cfg.Dir, "pages-1.img"))
	if err != nil || !bytes.Equal(pages, pattern(1, 1)) {
		t.Fatalf("pages-1.img: %v, %d bytes", err, len(pages))
	}
	img, err = os.ReadFile(filepath.Join(s.cfg.Dir, "pagemap-42.img"))
	if err != nil {
		t.Fatal(err)
	}
	if _, recs := rawRecords(t, img); len(recs) != 1 {
		t.Fatalf("pagemap of an opened key without pages: %d records, want the head", len(recs))
	}
	if fi, err := os.Stat(filepath.Join(s.cfg.Dir, "pages-2.img")); err != nil || fi.Size() != 0 {
		t.Fatalf("pages-2.img: %v", err)
	}
}

// TestCommitSparse: zero pages are holes that read back as zeros.
func TestCommitSparse(t *testing.T) {
	const n = 1024 // 4 MiB, one data page in 64
	s := newTestStore(t, Config{})
	data := make([]byte, n*PageSize)
	for i := 0; i < n; i += 64 {
		copy(data[i*PageSize:], pattern(1, byte(i)))
	}
	if err := s.Add(task, base, n, FlagPresent, data); err != nil {
		t.Fatal(err)
	}
	if err := s.AddZero(task, base+n*PageSize, 16); err != nil { // trailing zeros
		t.Fatal(err)
	}
	if st := s.Stats(); st.ZeroPages != n-n/64+16 || st.Bytes != n/64*PageSize {
		t.Fatalf("stats %+v", st.Counts)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(s.cfg.Dir, "pages-1.img")
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(data), make([]byte, 16*PageSize)...)
	if !bytes.Equal(got, want) {
		t.Fatalf("pages image differs (%d bytes, want %d)", len(got), len(want))
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if used := st.Blocks * 512; used >= fi.Size()/4 {
		t.Fatalf("pages image of %d bytes uses %d bytes of blocks: not sparse", fi.Size(), used)
	}
	t.Logf("pages image: %d bytes, %d allocated", fi.Size(), st.Blocks*512)
	sets := readImages(t, s.cfg.Dir)
	if e := sets[task].pm.Entries; !slices.Equal(e, []Entry{{base, n + 16, FlagPresent}}) {
		t.Fatalf("entries %v", e)
	}
}

// TestCommitBesideOtherImages: Commit adds its files to a dir holding
// CRIU's other images and never overwrites one.
func TestCommitBesideOtherImages(t *testing.T) {
	tests := []struct {
		name     string
		existing string // a file already in Dir
		refused  bool
	}{
		{"other images", "core-1.img", false},
		{"pagemap exists", "pagemap-1.img", true},
		{"pages exists", "pages-2.img", true},
		{"shmem pagemap exists", "pagemap-shmem-77.img", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "images")
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			old := []byte("already here")
			if err := os.WriteFile(filepath.Join(dir, tt.existing), old, 0o600); err != nil {
				t.Fatal(err)
			}
			s := newTestStore(t, Config{Dir: dir})
			m := model{}
			for _, o := range []op{
				{k: task, vaddr: base, n: 2, flags: FlagPresent, data: pattern(2, 1)},
				{k: task2, vaddr: base, n: 1, flags: FlagPresent, data: pattern(1, 2)},
				{k: shm, vaddr: 0, n: 1, flags: FlagPresent, data: pattern(1, 3)},
			} {
				if err := o.apply(s); err != nil {
					t.Fatal(err)
				}
				m.apply(o)
			}
			err := s.Commit()
			if got, err := os.ReadFile(filepath.Join(dir, tt.existing)); err != nil || !bytes.Equal(got, old) {
				t.Fatalf("%s changed: %v", tt.existing, err)
			}
			if !tt.refused {
				if err != nil {
					t.Fatal(err)
				}
				readImages(t, dir)
				return
			}
			if !errors.Is(err, fs.ErrExist) {
				t.Fatalf("commit over %s: %v, want fs.ErrExist", tt.existing, err)
			}
			ents, _ := os.ReadDir(dir)
			if len(ents) != 1 {
				t.Fatalf("refused commit left %d files in dir", len(ents))
			}
			// The store is still usable: clear the way and commit.
			if err := os.Remove(filepath.Join(dir, tt.existing)); err != nil {
				t.Fatal(err)
			}
			m.apply(op{k: task, vaddr: base + 5*PageSize, n: 1, flags: FlagLazy})
			if err := s.Add(task, base+5*PageSize, 1, FlagLazy, nil); err != nil {
				t.Fatal(err)
			}
			m.check(t, s, true)
		})
	}
}

func TestCommitCreatesDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "images")
	s := newTestStore(t, Config{Dir: dir, SpoolDir: filepath.Join(t.TempDir(), "spool")})
	m := model{}
	o := op{k: task, vaddr: base, n: 1, flags: FlagPresent, data: pattern(1, 1)}
	if err := o.apply(s); err != nil {
		t.Fatal(err)
	}
	m.apply(o)
	m.check(t, s, true)
	if _, err := os.Stat(stagingDir(dir)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("staging dir left after commit: %v", err)
	}
}

// TestPartialCommit: staged files left by a cut-short commit are reported
// and block the next commit.
func TestPartialCommit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	staging := stagingDir(dir)
	if err := os.MkdirAll(staging, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"pagemap-1.img", "unrelated"} {
		if err := os.WriteFile(filepath.Join(staging, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	left, err := Partial(dir)
	if err != nil || !slices.Equal(left, []string{"pagemap-1.img"}) {
		t.Fatalf("partial: %v, %v", left, err)
	}
	s := newTestStore(t, Config{Dir: dir})
	if err := s.AddZero(task, base, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("commit over a partial set: %v, want fs.ErrExist", err)
	}
	if left, err := Partial(t.TempDir()); err != nil || len(left) != 0 {
		t.Fatalf("partial of a clean dir: %v, %v", left, err)
	}
}

// TestStagingSymlinkRefused: a symlink planted where the store stages
// (DIR.partial, beside the images dir, where another local user may create
// names) is refused, and nothing is written where it points (issue 12:
// the page server's staging followed it). The negative control: the same
// store without the link commits.
func TestStagingSymlinkRefused(t *testing.T) {
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "images")
	target := filepath.Join(tmp, "elsewhere")
	if err := os.Mkdir(target, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, stagingDir(dir)); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Config{Dir: dir}); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Fatalf("store over a planted staging symlink: %v, want refused", err)
	}
	if ents, _ := os.ReadDir(target); len(ents) != 0 {
		t.Fatalf("wrote %d files through the planted link", len(ents))
	}
	os.Remove(stagingDir(dir))
	s := newTestStore(t, Config{Dir: dir})
	if err := s.AddZero(task, base, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		t.Fatalf("negative control: %v", err)
	}
}

package pagestore

import (
	"bufio"
	"encoding/binary"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// newTestStore returns a Store for a fresh images dir, closed at cleanup.
func newTestStore(t testing.TB, cfg Config) *Store {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = filepath.Join(t.TempDir(), "images")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// pattern returns n pages, page i filled with bytes derived from seed and
// i, none of them zero.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n*PageSize)
	for i := range b {
		b[i] = byte(i/PageSize)*31 + seed + byte(i%251) | 1
	}
	return b
}

// imageSet is one pagemap image and its pages image, read back from a
// directory with ReadPagemap.
type imageSet struct {
	key   Key
	pm    *Pagemap
	pages []byte // the whole pages image
	// parent holds the pages of the parent level (dir/parent/) that
	// PE_PARENT entries name; nil without such entries.
	parent map[uint64]page
}

// readImages reads every pagemap image of dir and its pages image.
func readImages(t testing.TB, dir string) map[Key]*imageSet {
	return readLevel(t, dir, false)
}

// readLevel reads the images of one level. A parent level's pages image
// may be longer than its pagemap needs (the spool it is linked from holds
// pages placed after it was taken).
func readLevel(t testing.TB, dir string, isParent bool) map[Key]*imageSet {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	sets := make(map[Key]*imageSet)
	var parents map[Key]*imageSet
	for _, e := range ents {
		k, ok := keyOf(e.Name())
		if !ok {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		pm, err := ReadPagemap(bufio.NewReader(f))
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		pages, err := os.ReadFile(filepath.Join(dir, pagesName(pm.PagesID)))
		if err != nil {
			t.Fatalf("pages of %s: %v", e.Name(), err)
		}
		want := pm.PresentPages() * PageSize
		if got := uint64(len(pages)); got != want && !(isParent && got > want) {
			t.Fatalf("%s: pages image of %d bytes, pagemap says %d", e.Name(), len(pages), want)
		}
		is := &imageSet{key: k, pm: pm, pages: pages}
		_, statErr := os.Stat(filepath.Join(dir, "parent"))
		if statErr == nil && slices.ContainsFunc(pm.Entries, func(e Entry) bool { return e.Flags&FlagParent != 0 }) {
			// A parent level Commit wrote (PE_PARENT pages a client
			// sent name a parent the store does not hold).
			if parents == nil {
				parents = readLevel(t, filepath.Join(dir, "parent"), true)
			}
			if parents[k] == nil {
				t.Fatalf("%s: PE_PARENT entries but no parent pagemap", e.Name())
			}
			is.parent = parents[k].pagesOf()
		}
		sets[k] = is
	}
	return sets
}

// keyOf parses a pagemap image name.
func keyOf(name string) (Key, bool) { return ParsePagemapName(name) }

// page describes one page of an image set.
type page struct {
	flags uint32
	data  []byte // nil unless present
}

// eachPage calls fn for every page of the set in pagemap order.
func (is *imageSet) eachPage(fn func(vaddr uint64, p page)) {
	var off uint64
	for _, e := range is.pm.Entries {
		for i := range e.NrPages {
			p := page{flags: e.Flags}
			if e.Flags == FlagParent {
				if pp, ok := is.parent[e.Vaddr+i*PageSize]; ok {
					p = pp // the page as the parent level holds it
				}
			}
			if e.Flags&FlagPresent != 0 {
				p.data = is.pages[off : off+PageSize]
				off += PageSize
			}
			fn(e.Vaddr+i*PageSize, p)
		}
	}
}

// pagesOf returns every page of the set by address.
func (is *imageSet) pagesOf() map[uint64]page {
	m := make(map[uint64]page)
	is.eachPage(func(vaddr uint64, p page) { m[vaddr] = p })
	return m
}

// rawRecords splits an image into its records, independently of
// ReadPagemap.
func rawRecords(t testing.TB, img []byte) (magics [2]uint32, recs [][]byte) {
	t.Helper()
	if len(img) < 8 {
		t.Fatalf("image of %d bytes", len(img))
	}
	magics[0], magics[1] = binary.LittleEndian.Uint32(img), binary.LittleEndian.Uint32(img[4:])
	for rest := img[8:]; len(rest) > 0; {
		if len(rest) < 4 {
			t.Fatalf("torn size word")
		}
		n := int(binary.LittleEndian.Uint32(rest))
		if len(rest) < 4+n {
			t.Fatalf("torn record of %d bytes", n)
		}
		recs = append(recs, slices.Clone(rest[4:4+n]))
		rest = rest[4+n:]
	}
	return magics, recs
}

// loadImages feeds a dumped image set into s as a page-server client
// would: Open, then Add per entry in chunks of at most chunkPages pages.
func loadImages(t testing.TB, s *Store, sets map[Key]*imageSet, chunkPages uint64) {
	t.Helper()
	for _, is := range sets {
		if _, err := s.Open(is.key); err != nil {
			t.Fatal(err)
		}
		var off uint64
		for _, e := range is.pm.Entries {
			for done := uint64(0); done < e.NrPages; {
				n := min(chunkPages, e.NrPages-done)
				var data []byte
				if e.Flags&FlagPresent != 0 {
					data = is.pages[off : off+n*PageSize]
					off += n * PageSize
				}
				if err := s.Add(is.key, e.Vaddr+done*PageSize, n, e.Flags, data); err != nil {
					t.Fatal(err)
				}
				done += n
			}
		}
	}
}

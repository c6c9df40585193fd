package pagestore

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestFinalSet: after BeginFinal, Commit writes only the pages recorded or
// kept since, each with its newest content; pages recorded before and not
// named again (unmapped while pre-copy ran) are left out.
func TestFinalSet(t *testing.T) {
	tests := []struct {
		name   string
		linked bool // every page with content named again: the spool is the image
		final  func(t *testing.T, s *Store) model
	}{
		{"keep all", true, func(t *testing.T, s *Store) model {
			must(t, s.Keep(task, base, 32))
			return model{task: pagesOf(base, 32, 1)}
		}},
		{"keep some, resend some, drop the rest", false, func(t *testing.T, s *Store) model {
			must(t, s.Keep(task, base, 8))
			must(t, s.Add(task, base+8*PageSize, 4, FlagPresent, pattern(4, 9)))
			m := model{task: pagesOf(base, 8, 1)}
			for a, pg := range pagesOf(base+8*PageSize, 4, 9) {
				m[task][a] = pg
			}
			return m
		}},
		{"a new key only", false, func(t *testing.T, s *Store) model {
			must(t, s.Add(task2, base, 2, FlagPresent, pattern(2, 3)))
			return model{task2: pagesOf(base, 2, 3)}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestStore(t, Config{})
			must(t, s.Add(task, base, 32, FlagPresent, pattern(32, 1)))
			if err := s.Keep(task, base, 1); !errors.Is(err, ErrInvalid) {
				t.Fatalf("keep before BeginFinal: %v", err)
			}
			must(t, s.BeginFinal())
			if err := s.Keep(task, base+31*PageSize, 2); !errors.Is(err, ErrNotFound) {
				t.Fatalf("keep past the recorded pages: %v", err)
			}
			want := tt.final(t, s)
			if err := s.Commit(); err != nil {
				t.Fatal(err)
			}
			sets := readImages(t, s.cfg.Dir)
			for k, pages := range want {
				got := sets[k].pagesOf()
				if len(got) != len(pages) {
					t.Fatalf("%v: %d pages in the images, want %d", k, len(got), len(pages))
				}
				for a, pg := range pages {
					if g, ok := got[a]; !ok || string(g.data) != string(pg.data) {
						t.Fatalf("%v %#x: wrong or missing in the images", k, a)
					}
				}
			}
			for k := range sets {
				if _, ok := want[k]; !ok && len(sets[k].pagesOf()) != 0 {
					t.Fatalf("%v: pages in the images, want none", k)
				}
			}
			p := s.pagemap(task)
			spool, _ := p.sp.f.Stat()
			img, err := os.Stat(filepath.Join(s.cfg.Dir, pagesName(1)))
			if err != nil {
				t.Fatal(err)
			}
			if linked := os.SameFile(spool, img); linked != tt.linked {
				t.Fatalf("pages image is the spool: %v, want %v", linked, tt.linked)
			}
		})
	}
}

func pagesOf(vaddr uint64, n int, seed byte) map[uint64]page {
	data := pattern(n, seed)
	m := make(map[uint64]page)
	for i := range n {
		m[vaddr+uint64(i)*PageSize] = page{flags: FlagPresent, data: data[i*PageSize : (i+1)*PageSize]}
	}
	return m
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

package pagestore

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func TestConcurrentUse(t *testing.T) {
	s := newTestStore(t, Config{})
	const writers, rounds, pages = 4, 50, 16
	var wg sync.WaitGroup
	errs := make(chan error, 2*writers)
	for w := range writers {
		k := Key{KindTask, uint64(w + 1)}
		wg.Add(2)
		go func() { // each writer owns a key and also writes the shared one
			defer wg.Done()
			for r := range rounds {
				if err := s.Add(k, base, pages, FlagPresent, pattern(pages, byte(r))); err != nil {
					errs <- err
					return
				}
				if err := s.Add(shm, 0, pages, FlagPresent, samePages(pages, byte(w*rounds+r))); err != nil {
					errs <- err
					return
				}
			}
		}()
		go func() { // reads must see whole pages, never a torn mix
			defer wg.Done()
			buf := make([]byte, pages*PageSize)
			for range rounds {
				err := s.Read(shm, 0, buf)
				if errors.Is(err, ErrNotFound) {
					continue
				}
				if err != nil {
					errs <- err
					return
				}
				for i := range pages {
					p := buf[i*PageSize : (i+1)*PageSize]
					if !bytes.Equal(p, bytes.Repeat(p[:1], PageSize)) {
						errs <- fmt.Errorf("torn page %d", i)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	m := model{}
	for w := range writers {
		m.apply(op{k: Key{KindTask, uint64(w + 1)}, vaddr: base, n: pages, flags: FlagPresent, data: pattern(pages, rounds-1)})
	}
	buf := make([]byte, pages*PageSize)
	if err := s.Read(shm, 0, buf); err != nil {
		t.Fatal(err)
	}
	m.apply(op{k: shm, vaddr: 0, n: pages, flags: FlagPresent, data: buf})
	m.check(t, s, true)
}

// samePages returns n pages filled with b+1.
func samePages(n int, b byte) []byte { return bytes.Repeat([]byte{b | 1}, n*PageSize) }

func TestStates(t *testing.T) {
	s := newTestStore(t, Config{})
	if err := s.Add(task, base, 1, FlagPresent, pattern(1, 1)); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"add":      s.Add(task, base, 1, FlagPresent, pattern(1, 2)),
		"add zero": s.AddZero(task, base, 1),
		"commit":   s.Commit(),
		"open":     func() error { _, err := s.Open(task2); return err }(),
	} {
		if !errors.Is(err, ErrCommitted) {
			t.Errorf("%s after commit: %v, want ErrCommitted", name, err)
		}
	}
	buf := make([]byte, PageSize)
	if err := s.Read(task, base, buf); err != nil || !bytes.Equal(buf, pattern(1, 1)) {
		t.Errorf("read after commit: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if err := s.Read(task, base, buf); !errors.Is(err, ErrClosed) {
		t.Errorf("read after close: %v, want ErrClosed", err)
	}
	if err := s.Commit(); !errors.Is(err, ErrClosed) {
		t.Errorf("commit after close: %v, want ErrClosed", err)
	}
	if _, err := os.Stat(s.cfg.SpoolDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spool dir left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.cfg.Dir, "pagemap-1.img")); err != nil {
		t.Errorf("committed image gone after close: %v", err)
	}
}

func TestOpenReportsParent(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	if err := os.MkdirAll(filepath.Join(dir, "..", "prev"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "..", "prev", "pagemap-42.img"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../prev", filepath.Join(dir, "parent")); err != nil {
		t.Fatal(err)
	}
	s := newTestStore(t, Config{Dir: dir})
	for _, tt := range []struct {
		k    Key
		want bool
	}{{task, false}, {task2, true}, {Key{KindShmem, 42}, false}} {
		got, err := s.Open(tt.k)
		if err != nil || got != tt.want {
			t.Errorf("open %v: %v, %v; want %v", tt.k, got, err, tt.want)
		}
	}
	s2 := newTestStore(t, Config{})
	if got, err := s2.Open(task2); err != nil || got {
		t.Errorf("open without parent dir: %v, %v", got, err)
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"default", DefaultConfig("/x"), true},
		{"zero limits take defaults", Config{Dir: "/x"}, true},
		{"no dir", Config{}, false},
		{"spool is dir", Config{Dir: "/x", SpoolDir: "/x/"}, false},
		{"max pages above address space", Config{Dir: "/x", MaxPages: MaxAddr}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.cfg.Validate(); (err == nil) != tt.ok {
				t.Fatalf("validate: %v, want ok %v", err, tt.ok)
			}
		})
	}
	err := errors.Unwrap(Config{SpoolDir: "/x", MaxPages: MaxAddr}.Validate())
	if j, ok := err.(interface{ Unwrap() []error }); !ok || len(j.Unwrap()) != 2 {
		t.Fatalf("validate reports every problem: %v", err)
	}
}

package pagestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/test/testenv"
)

// TestCRIURestoresCommittedImages proves that criu restore reads what
// Commit writes: a self-verifying workload is dumped by CRIU, its pagemaps
// and pages are fed into a Store as a page server would, Commit writes them
// beside copies of the dump's other images, and CRIU restores from there;
// the workload must run on and keep verifying its memory. The negative
// control corrupts one page in the store before Commit: the restored
// workload must report exactly that page CORRUPT.
func TestCRIURestoresCommittedImages(t *testing.T) {
	testenv.RequireRoot(t)
	path := testenv.RequireCRIU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := criu.Locate(ctx, path, nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		opts    testenv.WorkloadOpts
		corrupt int // page of the workload's region to corrupt; -1: none
		// levels: pages arrive out of order into a Store with
		// Config.Levels, so the task's images are two levels.
		levels bool
	}{
		{"private", testenv.WorkloadOpts{MiB: 16}, -1, false},
		{"private, two levels", testenv.WorkloadOpts{MiB: 16}, -1, true},
		{"shared anonymous", testenv.WorkloadOpts{MiB: 16, Shm: true}, -1, false},
		// No writers: one could rewrite the corrupted page before a check.
		// A slow verifier: the workload exits on CORRUPT, and a tree that
		// exits before CRIU detached from it fails the restore.
		{"private, corrupted page", testenv.WorkloadOpts{MiB: 16, PagesPerSec: -1, Verify: time.Second}, 1000, false},
		{"private, two levels, corrupted page", testenv.WorkloadOpts{MiB: 16, PagesPerSec: -1, Verify: time.Second}, 1000, true},
		{"shared anonymous, corrupted page", testenv.WorkloadOpts{MiB: 16, Shm: true, PagesPerSec: -1, Verify: time.Second}, 77, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := testenv.StartWorkload(t, nil, tt.opts)
			w.WaitProgress(t, 5)
			dumpDir := t.TempDir()
			if err := bin.Dump(ctx, criu.DumpRequest{Pid: w.PID(), ImagesDir: dumpDir}, nil); err != nil {
				t.Fatalf("dump: %v", err)
			}
			if code := w.WaitExit(t, 10*time.Second); code != -1 {
				t.Fatalf("workload exit %d after the dump, want killed", code)
			}
			atDump, err := w.LastStep()
			if err != nil {
				t.Fatal(err)
			}

			dumped := readImages(t, dumpDir)
			dir := filepath.Join(t.TempDir(), "images")
			copyOtherImages(t, dumpDir, dir)
			s := newTestStore(t, Config{Dir: dir, Levels: tt.levels})
			if tt.levels {
				loadHoldingBack(t, s, dumped)
			} else {
				loadImages(t, s, dumped, 64)
			}
			var corrupted Key
			var corruptAddr uint64
			if tt.corrupt >= 0 {
				corrupted, corruptAddr = corruptPage(t, s, w, dumped, tt.corrupt)
			}
			if err := s.Commit(); err != nil {
				t.Fatal(err)
			}
			st := s.Stats()
			t.Logf("store: %d keys, %d pages, %d zero, %d bytes held", len(st.Keys), st.Pages, st.ZeroPages, st.Bytes)
			comparePages(t, dumped, readImages(t, dir), corrupted, corruptAddr)
			if _, err := os.Stat(filepath.Join(dir, parentDir)); tt.levels != (err == nil) {
				t.Fatalf("parent level present: %v, want %v", err == nil, tt.levels)
			}

			pid, err := bin.Restore(ctx, criu.RestoreRequest{ImagesDir: dir}, nil)
			if err != nil {
				t.Fatalf("restore: %v", err)
			}
			if pids := w.Running(t); !slices.Equal(pids, []int{pid}) {
				t.Fatalf("running copies %v, want the restored %d", pids, pid)
			}
			if tt.corrupt < 0 {
				w.WaitProgress(t, 10)
				waitVerified(t, w, atDump.Verified+2)
				w.CheckHealthy(t)
				return
			}
			testenv.WaitFor(t, time.Minute, func() (bool, error) {
				return errors.Is(w.Health(), testenv.ErrUnhealthy), nil
			})
			lines, err := w.Lines("CORRUPT ")
			if err != nil || len(lines) != 1 || !strings.HasPrefix(lines[0], fmt.Sprintf("CORRUPT page=%d ", tt.corrupt)) {
				t.Fatalf("CORRUPT lines %q (%v), want one for page %d", lines, err, tt.corrupt)
			}
		})
	}
}

// loadHoldingBack loads every page, but the middle present page of each
// task pagemap comes last, as pre-copy sends a page first touched after
// round 1: the spool's order breaks there.
func loadHoldingBack(t *testing.T, s *Store, sets map[Key]*imageSet) {
	t.Helper()
	for k, is := range sets {
		if _, err := s.Open(k); err != nil {
			t.Fatal(err)
		}
		var present []uint64
		is.eachPage(func(vaddr uint64, p page) {
			if p.data != nil {
				present = append(present, vaddr)
			}
		})
		held := ^uint64(0)
		if k.Kind == KindTask && len(present) > 0 {
			held = present[len(present)/2]
		}
		var heldPage page
		is.eachPage(func(vaddr uint64, p page) {
			if vaddr == held {
				heldPage = p
				return
			}
			if err := s.Add(k, vaddr, 1, p.flags, p.data); err != nil {
				t.Fatal(err)
			}
		})
		if held != ^uint64(0) {
			if err := s.Add(k, held, 1, heldPage.flags, heldPage.data); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// copyOtherImages copies every image of src but pagemaps, pages and logs
// into a new dir dst.
func copyOtherImages(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		n := e.Name()
		if !e.Type().IsRegular() || strings.HasPrefix(n, "pagemap-") || strings.HasPrefix(n, "pages-") || strings.HasSuffix(n, ".log") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(src, n))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, n), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// corruptPage flips one byte of the given page of the workload's region in
// the store (word 64 of the page, as testenv's CorruptPage does) and
// returns where it is.
func corruptPage(t *testing.T, s *Store, w *testenv.Workload, dumped map[Key]*imageSet, index int) (Key, uint64) {
	t.Helper()
	region, shm := workloadRegion(t, w)
	k, vaddr := Key{}, region+uint64(index)*PageSize
	for key := range dumped {
		if shm == (key.Kind == KindShmem) {
			if k.Kind != 0 {
				t.Fatalf("more than one candidate pagemap: %v, %v", k, key)
			}
			k = key
		}
	}
	if shm {
		vaddr = uint64(index) * PageSize // offset in the segment
	}
	flags, ok := uint32(0), false
	dumped[k].eachPage(func(va uint64, p page) {
		if va == vaddr {
			flags, ok = p.flags, p.data != nil
		}
	})
	if !ok {
		t.Fatalf("page %d (%v %#x) not present in the dump", index, k, vaddr)
	}
	buf := make([]byte, PageSize)
	if err := s.Read(k, vaddr, buf); err != nil {
		t.Fatal(err)
	}
	buf[512] ^= 0xff
	if err := s.Add(k, vaddr, 1, flags, buf); err != nil {
		t.Fatal(err)
	}
	return k, vaddr
}

// workloadRegion parses "start ... region=0xADDR ... shm=0|1".
func workloadRegion(t *testing.T, w *testenv.Workload) (addr uint64, shm bool) {
	t.Helper()
	lines, err := w.Lines("start ")
	if err != nil || len(lines) == 0 {
		t.Fatalf("no start line: %v", err)
	}
	for _, f := range strings.Fields(lines[0]) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "region":
			addr, err = strconv.ParseUint(strings.TrimPrefix(v, "0x"), 16, 64)
		case "shm":
			shm = v == "1"
		}
		if err != nil {
			t.Fatalf("start line %q: %v", lines[0], err)
		}
	}
	if addr == 0 {
		t.Fatalf("no region in %q", lines[0])
	}
	return addr, shm
}

// comparePages checks that the committed images hold every dumped page
// with its flags and bytes, and nothing more; only the corrupted page
// differs.
func comparePages(t *testing.T, dumped, committed map[Key]*imageSet, corrupted Key, corruptAddr uint64) {
	t.Helper()
	if len(committed) != len(dumped) {
		t.Fatalf("%d pagemaps committed, %d dumped", len(committed), len(dumped))
	}
	for k, d := range dumped {
		c := committed[k]
		if c == nil {
			t.Fatalf("no committed pagemap for %v", k)
		}
		got := c.pagesOf()
		want := d.pagesOf()
		if len(got) != len(want) {
			t.Errorf("%v: %d pages committed, %d dumped", k, len(got), len(want))
		}
		diff := 0
		for va, p := range want {
			g := got[va]
			if g.flags != p.flags || !bytes.Equal(g.data, p.data) {
				if k == corrupted && va == corruptAddr {
					continue
				}
				diff++
			}
		}
		if diff > 0 {
			t.Errorf("%v: %d pages differ from the dump", k, diff)
		}
		t.Logf("%v: %d entries dumped, %d committed", k, len(d.pm.Entries), len(c.pm.Entries))
	}
	if corruptAddr != 0 || corrupted.Kind != 0 {
		if p := committed[corrupted].pagesOf()[corruptAddr]; bytes.Equal(p.data, dumped[corrupted].pagesOf()[corruptAddr].data) {
			t.Fatalf("corrupted page %v %#x equals the dump's", corrupted, corruptAddr)
		}
	}
}

// waitVerified waits until the workload finished n full verifications.
func waitVerified(t *testing.T, w *testenv.Workload, n uint64) {
	t.Helper()
	testenv.WaitFor(t, time.Minute, func() (bool, error) {
		s, err := w.LastStep()
		return err == nil && s.Verified >= n, w.Health()
	})
}

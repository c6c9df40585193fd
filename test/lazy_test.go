package test

import (
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/phaul/phaul/test/testenv"
)

// TestLazyRestore: the destination restores with CRIU's --lazy-pages and
// phaul's lazy-pages daemon fills the tree's memory from the migration's
// images once the tree runs, cold and in pre-copy, for a tree of three
// processes. The workload verifies every page itself after the move; the
// serve log must show the daemon placed the pages (faulted or pushed), and
// with --lazy-restore=false no daemon runs.
func TestLazyRestore(t *testing.T) {
	for _, tc := range []struct {
		name  string
		serve []string
		flags []string
		lazy  bool
	}{
		{"cold", []string{"--lazy-restore"}, []string{"--mode", "cold"}, true},
		{"precopy", []string{"--lazy-restore"}, []string{"--mode", "precopy"}, true},
		{"cold eager", []string{"--lazy-restore=false"}, []string{"--mode", "cold"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
			e.startServe(tc.serve...)
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 64, PagesPerSec: 1000, Children: 2})
			w.WaitProgress(t, 3)
			r := e.migrate(w.PID(), tc.flags...)
			// Until the fill is done, reading a restored process's
			// command line from outside may find its page missing and
			// come back empty (a remote access does not wait for the
			// daemon), so the copies are counted once it is.
			var placed int
			testenv.WaitFor(t, time.Minute, func() (bool, error) {
				placed = lazyPagesPlaced(e.readServeLog())
				return placed >= 0 || !tc.lazy, nil
			})
			root := e.assertMigrated(w, r)
			if kids := w.Children(t, root); len(kids) != 2 {
				t.Fatalf("restored tree: children %v, want 2", kids)
			}
			for i := 1; i <= 2; i++ {
				c := w.Child(i)
				c.WaitProgress(t, 3)
				c.CheckHealthy(t)
			}
			switch {
			case tc.lazy && placed < 64<<20/4096:
				t.Fatalf("lazy restore placed %d pages, fewer than the workload's 64 MiB", placed)
			case !tc.lazy && placed >= 0:
				t.Fatalf("--lazy-restore=false, yet the daemon placed %d pages", placed)
			}
			if tc.lazy && r.str("mode") == "precopy" && r.num("populate_ms_per_gib") > 0.01 {
				// The floor's memory part is what the restore writes
				// inside the freeze: nothing when it is lazy.
				t.Fatalf("pre-copy to a lazy restore: populate %v ms/GiB in the floor (%v ms), want none",
					r.num("populate_ms_per_gib"), r.num("floor_ms"))
			}
			t.Logf("restore %.0f ms, lazy pages placed %d, floor %.0f ms", r.num("criu_restore_ms"), placed, r.num("floor_ms"))
		})
	}
}

var lazyDoneRe = regexp.MustCompile(`msg="lazy pages done".* fault_pages=(\d+) pushed_pages=(\d+)`)

// lazyPagesPlaced returns the pages the lazy-pages daemon placed, from its
// "lazy pages done" log line, or -1 before it.
func lazyPagesPlaced(log string) int {
	m := lazyDoneRe.FindStringSubmatch(log)
	if m == nil {
		return -1
	}
	f, _ := strconv.Atoi(m[1])
	p, _ := strconv.Atoi(m[2])
	return f + p
}

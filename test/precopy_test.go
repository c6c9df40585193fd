package test

import (
	"testing"

	"github.com/phaul/phaul/test/testenv"
)

// TestPrecopyMigration moves a workload that keeps dirtying its memory in
// pre-copy mode over a shaped link: the memory moves in rounds while it
// runs, the last dirty pages while it is frozen, and the workload verifies
// every page of the copy itself.
func TestPrecopyMigration(t *testing.T) {
	for _, tc := range []struct {
		name    string
		tracker string
		mib     int
		pps     int // pages dirtied per second
		shm     bool
	}{
		{"uffd-wp", "uffd-wp", 128, 2000, false},
		{"hash", "hash", 64, 500, false},
		{"shared memory", "auto", 64, 1000, true}, // pre-copy skips it; CRIU's dump moves it
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
			e.startServe()
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: tc.mib, Threads: 2, PagesPerSec: tc.pps, Shm: tc.shm})
			w.WaitProgress(t, 3)
			r := e.migrate(w.PID(), "--mode", "precopy", "--tracker", tc.tracker)
			e.assertMigrated(w, r)
			if r.str("mode") != "precopy" || r.str("stop_reason") == "" {
				t.Fatalf("stats: mode %q, stop_reason %q", r.str("mode"), r.str("stop_reason"))
			}
			rounds, _ := r.stats["rounds"].([]any)
			kinds := map[string]int{}
			var sent float64
			for _, x := range rounds {
				rd, _ := x.(map[string]any)
				k, _ := rd["kind"].(string)
				kinds[k]++
				if k == "precopy" {
					v, _ := rd["pages_sent"].(float64)
					sent += v
				}
			}
			if kinds["precopy"] < 1 || kinds["frozen"] != 1 || kinds["final"] != 1 {
				t.Fatalf("rounds %v: want pre-copy rounds, one frozen, one final", kinds)
			}
			if !tc.shm && sent < float64(tc.mib<<20/4096) {
				t.Fatalf("pre-copy rounds sent %v pages, fewer than the workload's %d MiB", sent, tc.mib)
			}
			t.Logf("stop: %s; rounds %v; downtime %.0f ms", r.str("stop_reason"), kinds, r.num("downtime_ms"))
		})
	}
}

package test

import (
	"errors"
	"strings"
	"testing"
	"time"

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
		// The case: 512 MiB dirtying 8 MiB/s over 1 Gbit/s.
		{"uffd-wp", "uffd-wp", 512, 2048, false},
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

// TestPrecopyNegativeControl: with one round's collect thrown away (fault
// injection, as a tracker that missed writes), pages the workload wrote
// reach the destination stale, and its own verification must catch it.
// This is the check every pre-copy test relies on.
func TestPrecopyNegativeControl(t *testing.T) {
	t.Setenv("PHAUL_FAULT_DROP_COLLECT", "2")
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 64, Threads: 2, PagesPerSec: 4000})
	w.WaitProgress(t, 3)
	// A target no round can meet: rounds 2 and 3 run, the final set then
	// holds only what the later collects found.
	r := e.migrate(w.PID(), "--mode", "precopy", "--downtime-target", "1ms", "--max-rounds", "3")
	if r.code != 0 {
		t.Fatalf("migrate exit %d", r.code)
	}
	if !strings.Contains(r.out, "fault injection") {
		t.Fatalf("the fault was not injected:\n%s", r.out)
	}
	err := waitUnhealthy(w, 30*time.Second)
	if err == nil {
		t.Fatal("negative control: a round's dirty pages were dropped and the workload found nothing wrong")
	}
	t.Logf("caught: %v", err)
}

// waitUnhealthy waits for the workload's log to turn unhealthy.
func waitUnhealthy(w *testenv.Workload, timeout time.Duration) error {
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if err := w.Health(); errors.Is(err, testenv.ErrUnhealthy) {
			return err
		}
	}
	return nil
}

// TestPrecopyNoConvergence: a workload that dirties memory faster than the
// link carries it never fits the downtime target; pre-copy must still
// finish, freezing after rounds without gain or at --max-rounds, and say
// why.
func TestPrecopyNoConvergence(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 200e6})
	e.startServe()
	// 8000 pages/s = 31 MiB/s of dirt against 24 MiB/s of link.
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: 8000})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID(), "--mode", "precopy", "--max-rounds", "6")
	e.assertMigrated(w, r)
	reason := r.str("stop_reason")
	if !strings.Contains(reason, "no gain") && !strings.Contains(reason, "max rounds") {
		t.Fatalf("stop_reason %q: want no gain or max rounds", reason)
	}
	t.Logf("stopped: %s; downtime %.0f ms", reason, r.num("downtime_ms"))
}

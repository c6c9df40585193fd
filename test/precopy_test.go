package test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
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
		eager   bool // the destination restores eagerly (then pre-copy prefaults it)
	}{
		// The case: 512 MiB dirtying 8 MiB/s over 1 Gbit/s.
		{"uffd-wp", "uffd-wp", 512, 2048, false, true},
		{"uffd-wp lazy restore", "uffd-wp", 64, 2048, false, false},
		{"hash", "hash", 64, 500, false, false},
		{"shared memory", "auto", 64, 1000, true, false}, // pre-copy skips it; CRIU's dump moves it
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
			if tc.eager {
				e.startServe("--lazy-restore=false")
			} else {
				e.startServe()
			}
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
			// The downtime model and its measured parts.
			if r.num("floor_ms") < 150 || r.num("populate_ms_per_gib") <= 0 {
				t.Fatalf("floor %v ms, populate %v ms/GiB: want the fixed 150 ms plus a measured populate cost",
					r.num("floor_ms"), r.num("populate_ms_per_gib"))
			}
			dirty, criuPart := r.num("downtime_dirty_ms"), r.num("downtime_criu_ms")
			if dirty <= 0 || criuPart <= 0 || dirty+criuPart > r.num("downtime_ms")+0.01 {
				t.Fatalf("downtime %v ms split as dirty set %v + CRIU %v", r.num("downtime_ms"), dirty, criuPart)
			}
			prefaulted := strings.Contains(e.readServeLog(), "prefaulted memory for the restore")
			switch {
			case tc.eager && (r.num("prefault_ms") <= 0 || !prefaulted):
				t.Fatalf("prefault_ms %v: the destination restores eagerly and did not prefault before the freeze", r.num("prefault_ms"))
			case !tc.eager && (r.num("prefault_ms") != 0 || prefaulted):
				// A lazy restore writes no memory inside the freeze.
				t.Fatalf("prefault_ms %v (serve logged a prefault: %v): want none for a lazy restore", r.num("prefault_ms"), prefaulted)
			}
			if tc.tracker == "uffd-wp" && r.num("tracker_release_ms") <= 0 {
				t.Fatalf("tracker_release_ms %v: the release inside the freeze was not measured", r.num("tracker_release_ms"))
			}
			for _, x := range rounds {
				rd, _ := x.(map[string]any)
				if n, _ := rd["round"].(float64); rd["kind"] == "precopy" && n > 1 {
					if v, _ := rd["dirty_rate_mbps"].(float64); v <= 0 && rd["dirty_pages"] != nil {
						t.Fatalf("round %v: dirty %v pages but no dirty rate", n, rd["dirty_pages"])
					}
				}
			}
			t.Logf("stop: %s; rounds %v; downtime %.0f ms (dirty set %.0f, CRIU %.0f; tracker release %.1f); floor predicted %.0f ms",
				r.str("stop_reason"), kinds, r.num("downtime_ms"), dirty, criuPart, r.num("tracker_release_ms"), r.num("floor_ms"))
		})
	}
}

// TestPrecopyFloorAboveTarget: when the floor alone exceeds the target,
// pre-copy says so before round 1 and freezes once the dirty set stops
// shrinking instead of iterating for a target it cannot meet.
func TestPrecopyFloorAboveTarget(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: 1000})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID(), "--mode", "precopy", "--downtime-floor", "2s", "--max-rounds", "30")
	e.assertMigrated(w, r)
	warn := strings.Index(r.out, "the downtime floor alone exceeds the target")
	round2 := strings.Index(r.out, "round=2")
	if warn < 0 || (round2 >= 0 && round2 < warn) {
		t.Fatalf("no warning before the rounds that the floor exceeds the target:\n%s", r.out)
	}
	if reason := r.str("stop_reason"); !strings.Contains(reason, "stopped shrinking") {
		t.Fatalf("stop_reason %q: want the dirty set to have stopped shrinking", reason)
	}
	if n := len(r.stats["rounds"].([]any)); n > 30 {
		t.Fatalf("%d rounds", n)
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

// noConvergePPS is the dirty rate of the workloads that must not converge
// over the 200 Mbit/s link, in pages per second (2.6 times the link).
const noConvergePPS = 16000

// TestPrecopyNoConvergence: a workload that dirties memory faster than the
// link carries it never fits the downtime target; pre-copy must still
// finish, freezing after rounds without gain or at --max-rounds, and say
// why.
func TestPrecopyNoConvergence(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 200e6})
	e.startServe()
	// 16000 pages/s = 62 MiB/s of dirt against 24 MiB/s of link: a
	// loaded machine that gives the writers half their CPU still leaves
	// them faster than the link.
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: noConvergePPS})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID(), "--mode", "precopy", "--max-rounds", "6")
	e.assertMigrated(w, r)
	reason := r.str("stop_reason")
	if !strings.Contains(reason, "no gain") && !strings.Contains(reason, "max rounds") {
		t.Fatalf("stop_reason %q: want no gain or max rounds (dirty rates by round, Mbit/s: %v; link 200)", reason, roundValues(r, "dirty_rate_mbps"))
	}
	t.Logf("stopped: %s; downtime %.0f ms", reason, r.num("downtime_ms"))
}

// TestPrecopyAutoConverge: the workload of TestPrecopyNoConvergence, which
// dirties faster than the link carries, with --auto-converge: phaul
// throttles its CPU in a cpu cgroup it creates, step by step, until it
// converges or max rounds stops it; the stats report the throttle, phaul
// gives the tree back its cpu cgroups before CRIU freezes it, and phaul's
// group is gone.
func TestPrecopyAutoConverge(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 200e6})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: noConvergePPS, CPUCgroup: true})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID(), "--mode", "precopy", "--auto-converge", "--max-rounds", "30")
	pid := e.assertMigrated(w, r)
	reason := r.str("stop_reason")
	if r.num("auto_converge_pct") < 20 || !strings.Contains(reason, "auto-converge throttled") {
		t.Fatalf("auto_converge_pct %v, stop_reason %q: want a throttle applied and reported (dirty rates by round, Mbit/s: %v; link 200)", r.num("auto_converge_pct"), reason, roundValues(r, "dirty_rate_mbps"))
	}
	var throttled []float64
	for _, x := range r.stats["rounds"].([]any) {
		rd, _ := x.(map[string]any)
		if v, _ := rd["throttle_pct"].(float64); v > 0 {
			throttled = append(throttled, v)
		}
	}
	if len(throttled) == 0 {
		t.Fatal("no round ran throttled")
	}
	// Released before CRIU froze the tree: CRIU dumps it in the cgroups
	// it came from.
	released := strings.Index(r.out, "throttle released")
	dump := strings.Index(r.out, "phase=dump")
	if released < 0 || dump < 0 || released > dump {
		t.Fatalf("throttle released at %d, dump phase at %d of the output: want the release first\n%s", released, dump, r.out)
	}
	if cg, err := linux.ProcessCgroupV1(pid, "cpu"); err != nil || strings.Contains(cg, "throttle") {
		t.Fatalf("restored copy %d in cpu cgroup %q (%v)", pid, cg, err)
	}
	root, err := linux.CPUV1Root()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "phaul", r.str("migration_id")+"-throttle")); !os.IsNotExist(err) {
		t.Fatalf("phaul's throttle group left behind: %v", err)
	}
	t.Logf("stopped: %s; throttle by round %v; downtime %.0f ms", reason, throttled, r.num("downtime_ms"))
}

// roundValues returns one numeric field of every round in the stats.
func roundValues(r result, key string) []float64 {
	var out []float64
	for _, x := range r.stats["rounds"].([]any) {
		rd, _ := x.(map[string]any)
		v, _ := rd[key].(float64)
		out = append(out, v)
	}
	return out
}

// TestPrecopyMemfdPrivate: CRIU's lazy dump cannot take a memfd mapped
// private ("Can't splice all pages to pipe"). Pre-copy sees it before the
// freeze, runs the full final dump instead and says why in the stats; the
// workload checks both the file's pages and its private copies after the
// move.
func TestPrecopyMemfdPrivate(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500, Memfd: true})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID(), "--mode", "precopy")
	e.assertMigrated(w, r)
	if r.str("final_dump") != "full" || !strings.Contains(r.str("final_dump_why"), "memfd") {
		t.Fatalf("final_dump %q (%q): want full, because of the memfd", r.str("final_dump"), r.str("final_dump_why"))
	}
	before, err := w.Lines("ok memfd")
	if err != nil {
		t.Fatal(err)
	}
	testenv.WaitFor(t, 30*time.Second, func() (bool, error) {
		after, err := w.Lines("ok memfd")
		return len(after) > len(before), errors.Join(err, w.Health())
	})
}

// TestUntouchedMemoryStaysUnpopulated: a private file mapping the workload
// never touched holds no private page on the source, and CRIU dumps none
// of it; the restored copy must hold none either. The uffd-wp tracker
// leaves markers on such pages, which pagemap reports as swapped and CRIU's
// dump, run while the tracker is armed, would carry as private copies of
// the file's content.
func TestUntouchedMemoryStaysUnpopulated(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"cold", []string{"--mode", "cold"}},
		{"precopy uffd-wp lazy", []string{"--mode", "precopy", "--tracker", "uffd-wp"}},
		{"precopy uffd-wp full", []string{"--mode", "precopy", "--tracker", "uffd-wp", "--final-dump", "full"}},
		{"precopy hash", []string{"--mode", "precopy", "--tracker", "hash"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{})
			e.startServe()
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500, UntouchedMiB: 64})
			w.WaitProgress(t, 3)
			lines, err := w.Lines("untouched ")
			if err != nil || len(lines) != 1 {
				t.Fatalf("untouched line: %q, %v", lines, err)
			}
			f := strings.Fields(lines[0])
			hex, _ := strings.CutPrefix(f[1], "region=0x")
			addr, err := strconv.ParseUint(hex, 16, 64)
			if len(f) != 3 || err != nil {
				t.Fatalf("%q: %v", lines[0], err)
			}
			if anon := smapsField(t, w.PID(), addr, "Anonymous:"); anon != 0 {
				t.Fatalf("source: untouched mapping holds %d kB of private pages", anon)
			}
			r := e.migrate(w.PID(), tc.flags...)
			pid := e.assertMigrated(w, r)
			if anon := smapsField(t, pid, addr, "Anonymous:"); anon != 0 {
				t.Fatalf("restored copy: the untouched mapping at %#x holds %d kB of private pages, the source's held none", addr, anon)
			}
		})
	}
}

// smapsField returns field (kB, such as "Anonymous:") of pid's mapping
// that starts at addr.
func smapsField(t *testing.T, pid int, addr uint64, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		t.Fatal(err)
	}
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		if start, _, ok := strings.Cut(line, "-"); ok && !strings.Contains(start, " ") {
			a, err := strconv.ParseUint(start, 16, 64)
			in = err == nil && a == addr
			continue
		}
		if v, ok := strings.CutPrefix(line, field); ok && in {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatalf("smaps %q: %v", line, err)
			}
			return kb
		}
	}
	t.Fatalf("pid %d has no mapping at %#x", pid, addr)
	return 0
}

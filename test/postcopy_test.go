package test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/test/testenv"
)

// postcopyStats returns the "postcopy" object of a migration's stats.
func postcopyStats(t *testing.T, r result) map[string]float64 {
	t.Helper()
	m, ok := r.stats["postcopy"].(map[string]any)
	if !ok {
		t.Fatalf("stats without postcopy: %v", r.stats)
	}
	out := make(map[string]float64, len(m))
	for k, v := range m {
		f, _ := v.(float64)
		out[k] = f
	}
	return out
}

// TestPostcopy moves the verifying workload in post-copy and hybrid modes,
// as a single process and as a tree, over the shaped link: the tree
// resumes on the destination before its memory arrived, the destination's
// daemon fetches what the final set left at the source (faults on one
// stream, the fill on the other) from the source's held, frozen tree, and
// the source drops its copy only once the destination has every page. The
// workload verifies every page itself, its steps never go back, exactly
// one copy runs, and the stats account for the pages that moved after the
// resume.
func TestPostcopy(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mode     string
		children int
	}{
		{"postcopy", "postcopy", 0},
		{"postcopy tree", "postcopy", 2},
		{"hybrid", "hybrid", 0},
		{"hybrid tree", "hybrid", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
			e.startServe()
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 64, PagesPerSec: 2000, Children: tc.children})
			w.WaitProgress(t, 3)
			before, err := w.LastStep()
			if err != nil {
				t.Fatal(err)
			}
			mark := time.Now()
			r := e.migrate(w.PID(), "--mode", tc.mode)
			root := e.assertMigrated(w, r)
			after, err := w.LastStep()
			if err != nil {
				t.Fatal(err)
			}
			if after.N <= before.N || after.Verified <= before.Verified {
				t.Fatalf("steps went from %+v to %+v: not forward", before, after)
			}
			if kids := w.Children(t, root); len(kids) != tc.children {
				t.Fatalf("restored tree: children %v, want %d", kids, tc.children)
			}
			for i := 1; i <= tc.children; i++ {
				c := w.Child(i)
				c.WaitProgress(t, 3)
				c.CheckHealthy(t)
			}
			pc := postcopyStats(t, r)
			served := pc["served_fault_pages"] + pc["served_fill_pages"]
			switch {
			case pc["remote_pages"] == 0:
				t.Fatalf("post-copy left no page at the source: %v", pc)
			case served < pc["remote_pages"]:
				t.Fatalf("the source served %v pages of the %v it left for the destination: %v", served, pc["remote_pages"], pc)
			case pc["refused_requests"] != 0:
				t.Fatalf("the source refused %v requests: %v", pc["refused_requests"], pc)
			case pc["remote_faults"]+pc["local_faults"] != pc["faults"]:
				t.Fatalf("faults %v, remote %v + local %v: every fault is one or the other", pc["faults"], pc["remote_faults"], pc["local_faults"])
			case tc.mode == "postcopy" && (pc["remote_faults"] == 0 || pc["served_fault_pages"] == 0):
				// The workload writes its memory at once: some of it
				// before the fill got there.
				t.Fatalf("post-copy: %v remote faults, %v pages served on the fault stream; want some of each: %v",
					pc["remote_faults"], pc["served_fault_pages"], pc)
			}
			if tc.mode == "postcopy" && pc["remote_pages"] < float64((1+tc.children)*64<<20/4096)*0.9 {
				t.Fatalf("post-copy left %v pages at the source, want about the tree's %d MiB per process", pc["remote_pages"], 64)
			}
			if tc.mode == "hybrid" && len(r.stats["rounds"].([]any)) < 2 {
				t.Fatalf("hybrid ran no pre-copy round: %v", r.stats["rounds"])
			}
			stall, _ := w.LongestTickGap(mark)
			t.Logf("%s: downtime %.0f ms, workload stall %v, post-copy %.0f ms, remote %v pages (faults %v, fill %v), fault p99 %.2f ms, remote fault p99 %.2f ms (%v faults), local fault p99 %.2f ms (%v)",
				tc.mode, r.num("downtime_ms"), stall, pc["ms"], pc["remote_pages"], pc["served_fault_pages"], pc["served_fill_pages"],
				pc["fault_p99_ms"], pc["remote_fault_p99_ms"], pc["remote_faults"], pc["local_fault_p99_ms"], pc["local_faults"])
		})
	}
}

// TestPostcopyConnectionCut cuts the migration's TCP connection (ss -K,
// the kernel aborts the socket and resets the peer) twice while the
// destination's tree runs and still fetches its memory: the destination's
// faulting threads wait, the source keeps its held tree and reconnects,
// the fetches in flight are asked again, and the workload ends up whole on
// the destination, one copy.
func TestPostcopyConnectionCut(t *testing.T) {
	testenv.RequireCommand(t, "ss")
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 2e8})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 128, PagesPerSec: 2000})
	w.WaitProgress(t, 3)
	m := e.startMigrate(w.PID(), "--mode", "postcopy", "--postcopy-recover-timeout", "30s")
	cuts := 0
	for cuts < 2 {
		testenv.WaitFor(t, 2*time.Minute, func() (bool, error) {
			select {
			case <-m.done:
				return false, fmt.Errorf("migrate exited before post-copy could be cut (%d cuts)\n%s", cuts, m.out)
			default:
			}
			return strings.Count(m.out.String(), "phase=postcopy") > 0 &&
				strings.Count(m.out.String(), "post-copy: reconnected") == cuts, nil
		})
		time.Sleep(700 * time.Millisecond) // some pages move first
		out, err := e.hosts.Src.Command(context.Background(), "ss", "-K", "dst", e.hosts.Dst.Addr.String()).CombinedOutput()
		if err != nil {
			t.Fatalf("ss -K: %v\n%s", err, out)
		}
		if strings.Contains(m.out.String(), "post-copy done") {
			t.Fatalf("post-copy ended before cut %d: make the workload larger or the link slower\n%s", cuts+1, m.out)
		}
		cuts++
		t.Logf("cut %d:\n%s", cuts, out)
	}
	r := m.wait(3 * time.Minute)
	root := e.assertMigrated(w, r)
	pc := postcopyStats(t, r)
	if pc["recoveries"] < 2 {
		t.Fatalf("post-copy recovered %v times after 2 cuts: %v\n%s", pc["recoveries"], pc, r.out)
	}
	if served := pc["served_fault_pages"] + pc["served_fill_pages"]; served < pc["remote_pages"] {
		t.Fatalf("the source served %v of the %v pages it left: %v", served, pc["remote_pages"], pc)
	}
	if !strings.Contains(e.readServeLog(), "post-copy resumed on a new connection") {
		t.Fatalf("serve did not log the resume\n%s", e.readServeLog())
	}
	t.Logf("root %d; post-copy %.0f ms with %v recoveries; remote %v pages", root, pc["ms"], pc["recoveries"], pc["remote_pages"])
}

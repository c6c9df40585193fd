package test

import (
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
			}
			if tc.mode == "postcopy" && pc["remote_pages"] < float64((1+tc.children)*64<<20/4096)*0.9 {
				t.Fatalf("post-copy left %v pages at the source, want about the tree's %d MiB per process", pc["remote_pages"], 64)
			}
			if tc.mode == "hybrid" && len(r.stats["rounds"].([]any)) < 2 {
				t.Fatalf("hybrid ran no pre-copy round: %v", r.stats["rounds"])
			}
			stall, _ := w.LongestTickGap(mark)
			t.Logf("%s: downtime %.0f ms, workload stall %v, post-copy %.0f ms, remote %v pages (faults %v, fill %v), fault p99 %.2f ms, remote fault p99 %.2f ms",
				tc.mode, r.num("downtime_ms"), stall, pc["ms"], pc["remote_pages"], pc["served_fault_pages"], pc["served_fill_pages"],
				pc["fault_p99_ms"], pc["remote_fault_p99_ms"])
		})
	}
}

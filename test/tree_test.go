package test

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

// TestTreeMigration moves a process tree: a workload that forked two
// children after filling its memory (copy-on-write shared until written),
// each child dirtying and verifying its own copy, cold and in pre-copy
// mode. The whole tree must arrive: one root on the destination with
// exactly its two children, all in the destination's namespace, none left
// on the source, and every process's own log must keep verifying its
// memory with steps that never go back.
func TestTreeMigration(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"cold", []string{"--mode", "cold"}},
		{"precopy", []string{"--mode", "precopy", "--tracker", "uffd-wp"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
			e.startServe()
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: 1000, Children: 2})
			w.WaitProgress(t, 3)
			srcKids := w.Children(t, w.PID())
			if len(srcKids) != 2 {
				t.Fatalf("source tree: children %v, want 2", srcKids)
			}
			before := []testenv.Step{}
			for i := 1; i <= 2; i++ {
				s, err := w.Child(i).LastStep()
				if err != nil {
					t.Fatal(err)
				}
				before = append(before, s)
			}
			r := e.migrate(w.PID(), tc.flags...)
			root := e.assertMigrated(w, r)
			if tc.name == "precopy" {
				// Every process of the tree was tracked and copied in the
				// rounds, each its own copy of the region.
				var sent float64
				for _, x := range r.stats["rounds"].([]any) {
					rd, _ := x.(map[string]any)
					if rd["kind"] == "precopy" {
						v, _ := rd["pages_sent"].(float64)
						sent += v
					}
				}
				if want := float64(3 * 32 << 20 / 4096); sent < want {
					t.Fatalf("pre-copy rounds sent %v pages, fewer than the tree's three regions (%v)", sent, want)
				}
			}
			kids := w.Children(t, root)
			if len(kids) != 2 {
				t.Fatalf("restored tree under %d: children %v, want 2", root, kids)
			}
			for _, k := range kids {
				if slices.Contains(srcKids, k) {
					t.Fatalf("child %d is a source process", k)
				}
				if in, err := e.hosts.Dst.Contains(k); err != nil || !in {
					t.Fatalf("child %d does not run in the destination namespace: %v", k, err)
				}
			}
			for _, k := range srcKids {
				if processAlive(k) {
					t.Fatalf("source child %d still runs", k)
				}
			}
			for i := 1; i <= 2; i++ {
				c := w.Child(i)
				testenv.WaitFor(t, time.Minute, func() (bool, error) {
					last, err := c.LastStep()
					return last.Verified >= before[i-1].Verified+3, err
				})
				c.CheckHealthy(t)
			}
		})
	}
}

// processAlive reports whether pid runs (exists and is not a zombie).
func processAlive(pid int) bool {
	st, err := linux.ReadProcessStat(pid)
	return err == nil && st.State != 'Z'
}

// TestTreeTaskStates moves a tree that holds a zombie and a child stopped
// by SIGSTOP, cold and in pre-copy: CRIU restores the zombie as a zombie
// and the stopped child stopped, and phaul adds no signal (the child logs
// a FAIL line if it is ever continued). Pre-copy tracks neither: a zombie
// has no memory, the stopped child is tracked like any other process.
func TestTreeTaskStates(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flags []string
	}{
		{"cold", []string{"--mode", "cold"}},
		{"precopy uffd-wp", []string{"--mode", "precopy", "--tracker", "uffd-wp"}},
		{"precopy hash", []string{"--mode", "precopy", "--tracker", "hash"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, testenv.HostsOpts{})
			e.startServe()
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500, Zombie: true, StoppedChild: true})
			w.WaitProgress(t, 3)
			states := func(root int) string {
				t.Helper()
				b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", root, root))
				if err != nil {
					t.Fatal(err)
				}
				var out []string
				for _, f := range strings.Fields(string(b)) {
					pid, _ := strconv.Atoi(f)
					st, err := linux.ReadProcessStat(pid)
					if err != nil {
						t.Fatal(err)
					}
					out = append(out, string(st.State))
				}
				slices.Sort(out)
				return strings.Join(out, "")
			}
			if got := states(w.PID()); got != "TZ" {
				t.Fatalf("source tree children states %q, want a stopped child and a zombie (TZ)", got)
			}
			r := e.migrate(w.PID(), tc.flags...)
			root := e.assertMigrated(w, r)
			if got := states(root); got != "TZ" {
				t.Fatalf("restored tree children states %q, want a stopped child and a zombie (TZ)", got)
			}
			w.CheckHealthy(t) // no "FAIL stopped SIGCONT"
		})
	}
}

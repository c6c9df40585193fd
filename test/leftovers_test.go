package test

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

var leftoverRuns = flag.Int("leftover-runs", 6, "migrations TestHostLeftovers runs (make soak: 50)")

// TestHostLeftovers runs migrations one after another, cold and pre-copy,
// with and without an established TCP connection (CRIU locks it), each of
// a fresh workload that is then stopped, and compares both hosts before and
// after: nftables tables in every namespace involved, cgroups in every
// hierarchy, the work directories, CRIU processes and mounts. A migration
// must leave nothing behind; CRIU's network-lock table alone, one per dump,
// made every later freeze longer. The freeze of the first and of the last
// migration are logged (make bench measures speed).
func TestHostLeftovers(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 1e9})
	e.startServe()
	srcPin := e.hosts.Src.Command(context.Background(), "sleep", "1d") // a process in the source's netns
	if err := srcPin.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srcPin.Process.Kill(); srcPin.Wait() })
	snap := func() hostState { return snapshotHost(t, e, srcPin.Process.Pid) }

	// One migration first: CRIU's caches (/run/criu.kdat) and the work
	// directories are made once, not per migration.
	e.leftoverRun(t, 0)
	before := snap()
	var downtimes []float64
	for i := 1; i <= *leftoverRuns; i++ {
		downtimes = append(downtimes, e.leftoverRun(t, i))
	}
	after := snap()
	if diff := before.diff(after); diff != "" {
		t.Fatalf("after %d migrations the hosts hold more than before:\n%s", *leftoverRuns, diff)
	}
	t.Logf("%d migrations left nothing; downtime first %.0f ms, last %.0f ms", *leftoverRuns, downtimes[0], downtimes[len(downtimes)-1])
}

// leftoverRun migrates a fresh workload (run i picks the mode and whether
// it holds a TCP connection) and stops the restored copy; it returns the
// migration's downtime.
func (e *env) leftoverRun(t *testing.T, i int) float64 {
	t.Helper()
	mode := []string{"cold", "precopy"}[i%2]
	tcp := i%4 >= 2
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 8, PagesPerSec: 200, TCPPair: tcp})
	w.WaitProgress(t, 2)
	flags := []string{"--mode", mode}
	if tcp {
		flags = append(flags, "--tcp-established")
	}
	r := e.migrate(w.PID(), flags...)
	e.assertMigrated(w, r)
	w.Stop(t)
	return r.num("downtime_ms")
}

// hostState is what a migration could leave on the test hosts.
type hostState map[string][]string

// snapshotHost reads the state of the host namespaces, the source's (the
// network namespace of srcPID) and the destination's.
func snapshotHost(t *testing.T, e *env, srcPID int) hostState {
	t.Helper()
	st := hostState{}
	tables := func(where string, list func() ([]linux.NftTable, error)) {
		ts, err := list()
		if err != nil {
			t.Fatalf("nftables tables of %s: %v", where, err)
		}
		for _, tb := range ts {
			st["nftables "+where] = append(st["nftables "+where], tb.String())
		}
	}
	tables("host", linux.NftTables)
	tables("source", func() ([]linux.NftTable, error) { return linux.NftTablesIn(srcPID) })
	tables("destination", func() ([]linux.NftTable, error) { return linux.NftTablesIn(e.serve.Process.Pid) })
	roots, err := linux.CgroupRoots()
	if err != nil {
		t.Fatal(err)
	}
	// Only cgroups named for phaul: the machine's own come and go (this
	// sandbox makes one per command), and a migration without
	// --manage-cgroups creates no other.
	for _, r := range roots {
		filepath.WalkDir(r, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() && strings.Contains(strings.TrimPrefix(p, r), "phaul") {
				st["cgroups"] = append(st["cgroups"], p)
			}
			return nil
		})
	}
	for name, dir := range map[string]string{"source work dir": e.srcWork, "destination work dir": e.dstWork} {
		st[name] = dirNames(t, dir)
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "cmdline")); err == nil && isCRIUCmdline(b) {
			st["criu processes"] = append(st["criu processes"], p.Name())
		}
	}
	for name, pid := range map[string]string{"host": "self", "destination": fmt.Sprint(e.serve.Process.Pid)} {
		b, err := os.ReadFile(filepath.Join("/proc", pid, "mountinfo"))
		if err != nil {
			t.Fatal(err)
		}
		st["mounts "+name] = []string{fmt.Sprint(strings.Count(string(b), "\n"))}
	}
	for k := range st {
		slices.Sort(st[k])
	}
	return st
}

// diff lists what after holds that before did not.
func (before hostState) diff(after hostState) string {
	var out strings.Builder
	for k, vs := range after {
		for _, v := range vs {
			if !slices.Contains(before[k], v) {
				fmt.Fprintf(&out, "  %s: %s (before: %v)\n", k, v, before[k])
			}
		}
	}
	return out.String()
}

// isCRIUCmdline reports a CRIU process's command line (CRIU may run
// through a loader: deploy/install-criu.sh's wrapper).
func isCRIUCmdline(b []byte) bool {
	return strings.Contains(string(b), "/criu") || strings.HasPrefix(string(b), "criu\x00")
}

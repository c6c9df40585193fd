package test

import (
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/phaul"
	"github.com/phaul/phaul/test/testenv"
)

// TestGCPostcopyMigrateKilled kills phaul migrate (SIGKILL, from the test
// build's fault hook) as it enters COMMIT of a post-copy: CRIU's lazy dump
// holds the source tree frozen, and the destination never got COMMIT. The
// source copy must survive, held (phaul's death used to end CRIU's session
// cleanly, which killed the only whole copy); the destination drops its
// copy. From the source's journal alone (at commit) the migration is in
// doubt: `phaul gc --show` and `phaul gc` list the held tree and leave it
// held; `phaul gc --resolved ID=source`, as an operator runs it after
// reading the destination's log, resumes it and removes CRIU's network
// lock; a second `gc --show` finds nothing; and a fresh migration of the
// same workload succeeds.
func TestGCPostcopyMigrateKilled(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: 2000})
	w.WaitProgress(t, 3)
	src := w.PID()

	t.Setenv("PHAUL_FAULT_KILL_AT", "source:commit")
	m := e.startMigrate(src, "--mode", "postcopy")
	r := m.wait(2 * time.Minute)
	if ps := m.cmd.ProcessState; ps.Success() || !strings.Contains(ps.String(), "killed") {
		t.Fatalf("migrate: %v, want killed by its fault hook at commit\n%s", ps, r.out)
	}
	t.Setenv("PHAUL_FAULT_KILL_AT", "")
	id := migrationID(t, r.out)
	waitServeLog(t, e, regexp.MustCompile(`source lost before COMMIT`), time.Minute, nil)
	waitDirEmpty(t, e.dstWork, 30*time.Second)

	// The source copy exists, held by its CRIU (traced, not stepping).
	ents, err := phaul.ReadJournal(phaul.JournalDir(e.srcWork))
	if err != nil || len(ents) != 1 || ents[0].ID != id || ents[0].Phase != phaul.PhaseCommit || !ents[0].CRIUAlive() {
		t.Fatalf("source journal: %+v, %v; want %s at commit with its CRIU alive", ents, err, id)
	}
	held := func(when string) {
		t.Helper()
		tracer, err := linux.TracerPid(src)
		if err != nil || tracer != ents[0].CRIU {
			t.Fatalf("%s: source %d traced by %d (%v), want held by criu %d", when, src, tracer, err, ents[0].CRIU)
		}
	}
	held("after migrate died")
	frozen, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	if table := ents[0].NftTable; table == "" || !hasTable(t, src, table) {
		t.Fatalf("source journal names lock table %q; want it present in the source namespace", table)
	}

	// COMMIT was about to go: from the source's journal alone the
	// migration is in doubt. gc lists it and leaves it, --show or not.
	for _, args := range [][]string{{"--show"}, nil} {
		out, code := e.phaul(e.hosts.Src, append([]string{"gc", "--work-dir", e.srcWork}, args...)...)
		t.Logf("gc %v: exit %d\n%s", args, code, out)
		if code != 1 || !strings.Contains(out, "in doubt (commit)") || !strings.Contains(out, "--resolved "+id+"=source") {
			t.Fatalf("gc %v: exit %d, want 1 listing the held tree in doubt\n%s", args, code, out)
		}
		time.Sleep(500 * time.Millisecond) // the workload steps every few ms if it runs
		held("after gc " + strings.Join(args, " "))
		if now, err := w.LastStep(); err != nil || now.N != frozen.N {
			t.Fatalf("after gc %v: step %d (%v), want still %d: the tree must stay held", args, now.N, err, frozen.N)
		}
	}
	// The destination's log (above) says it dropped its copy: the
	// operator resolves for the source.
	out, code := e.phaul(e.hosts.Src, "gc", "--work-dir", e.srcWork, "--resolved", id+"=source")
	t.Logf("gc --resolved %s=source: exit %d\n%s", id, code, out)
	if code != 0 || !strings.Contains(out, "done: kill CRIU: the source tree resumes") {
		t.Fatalf("gc --resolved: exit %d, want 0, CRIU killed\n%s", code, out)
	}
	e.assertOnSource(w) // one copy, the source's, stepping and verifying its memory
	if now, err := w.LastStep(); err != nil || now.N <= frozen.N {
		t.Fatalf("after gc: step %d (%v), want past %d", now.N, err, frozen.N)
	}
	if hasTable(t, src, ents[0].NftTable) {
		t.Fatalf("CRIU's lock table %s left after gc", ents[0].NftTable)
	}
	if out, code := e.phaul(e.hosts.Src, "gc", "--work-dir", e.srcWork, "--show"); code != 0 || !strings.Contains(out, "nothing left over") {
		t.Fatalf("second gc --show: exit %d, want nothing left\n%s", code, out)
	}
	if left := dirNames(t, e.srcWork); len(left) > 0 {
		t.Fatalf("source work dir after gc: %v", left)
	}

	r = e.migrate(src, "--mode", "postcopy")
	e.assertMigrated(w, r)
}

// hasTable reports whether the network namespace of pid has nftables
// table "inet NAME".
func hasTable(t testing.TB, pid int, name string) bool {
	t.Helper()
	ts, err := linux.NftTablesIn(pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range ts {
		if tb.Name == name {
			return true
		}
	}
	return false
}

// TestCancel: `phaul cancel ID` during pre-copy's rounds rolls the
// migration back as QEMU's migrate_cancel does (the workload runs on at
// the source, untracked; the destination drops its copy; nothing is left
// for gc) and the same workload then migrates. Past COMMIT (post-copy
// running) a cancel is refused, by `phaul cancel` and by SIGTERM to
// migrate alike, and the migration completes.
func TestCancel(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: slowLink})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, faultWorkload)
	w.WaitProgress(t, 3)

	m := e.startMigrate(w.PID(), "--mode", "precopy")
	id := waitPhase(t, e, m, phaul.PhaseRounds)
	out, code := e.phaul(e.hosts.Src, "cancel", "--work-dir", e.srcWork, id)
	t.Logf("phaul cancel: exit %d\n%s", code, out)
	if code != 0 || !strings.Contains(out, "canceled") {
		t.Fatalf("phaul cancel during rounds: exit %d, want 0\n%s", code, out)
	}
	r := m.wait(time.Minute)
	assertRolledBack(t, r, id)
	e.assertOnSource(w)
	if left, err := dirty.Leftovers(w.PID()); err != nil || len(left) > 0 {
		t.Fatalf("the workload keeps tracking state after the cancel: %v (%v)", left, err)
	}
	waitDirEmpty(t, e.srcWork, 10*time.Second)
	waitDirEmpty(t, e.dstWork, 30*time.Second)
	for _, dir := range []string{e.srcWork, e.dstWork} {
		if out, code := e.phaul(nil, "gc", "--work-dir", dir, "--show"); code != 0 {
			t.Fatalf("gc --show %s after the cancel: exit %d\n%s", dir, code, out)
		}
	}

	m = e.startMigrate(w.PID(), "--mode", "postcopy")
	id = waitPhase(t, e, m, phaul.PhasePostcopy)
	out, code = e.phaul(e.hosts.Src, "cancel", "--work-dir", e.srcWork, id)
	t.Logf("phaul cancel in post-copy: exit %d\n%s", code, out)
	if code != 1 || !strings.Contains(out, "cannot be rolled back") {
		t.Fatalf("phaul cancel in post-copy: exit %d, want 1, refused\n%s", code, out)
	}
	if err := m.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r = m.wait(2 * time.Minute)
	if !strings.Contains(r.out, "cancel refused") {
		t.Errorf("migrate did not say it refused SIGTERM past COMMIT\n%s", r.out)
	}
	e.assertMigrated(w, r)
}

// waitPhase waits until m's source journal entry reaches p and returns
// the migration's id.
func waitPhase(t *testing.T, e *env, m *bgMigrate, p phaul.Phase) string {
	t.Helper()
	var id string
	testenv.WaitFor(t, time.Minute, func() (bool, error) {
		select {
		case <-m.done:
			t.Fatalf("migrate ended before %s\n%s", p, m.out)
		default:
		}
		ents, err := phaul.ReadJournal(phaul.JournalDir(e.srcWork))
		if err != nil || len(ents) != 1 {
			return false, err
		}
		id = ents[0].ID
		return ents[0].Phase == p, nil
	})
	return id
}

package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/checkpoint-restore/go-criu/v8/rpc"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/phaul"
	"github.com/phaul/phaul/test/testenv"
)

// The fault tests break a migration at a chosen point (the destination
// service stopped or killed, the link cut, the source killed) and check the
// workload itself afterwards: exactly one copy runs, never two, and it is
// healthy.

// slowLink shapes the src-dst link so that a 64 MiB workload's images take
// about eight seconds to cross: long enough to break the transfer midway.
const slowLink = 64_000_000 // bits per second

// faultWorkload is the workload the fault tests move.
var faultWorkload = testenv.WorkloadOpts{MiB: 64, Threads: 2, PagesPerSec: 2000}

// TestFaultServeSIGTERMAbortsInFlight stops the destination service while
// images are on the wire (before PREPARED): the service must drop the
// migration and exit 0, the source must roll back and fail with exit 1.
func TestFaultServeSIGTERMAbortsInFlight(t *testing.T) {
	e, w, m, id := startBreakableMigration(t, slowLink)

	if err := e.serve.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.serveDone:
	case <-time.After(60 * time.Second):
		t.Fatalf("serve still runs 60s after SIGTERM during a transfer\n%s", e.readServeLog())
	}
	if code := e.serve.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("serve exited %d after SIGTERM, want 0\n%s", code, e.readServeLog())
	}

	r := m.wait(60 * time.Second)
	assertRolledBack(t, r, id)
	log := e.readServeLog()
	if !strings.Contains(log, "migration failed") || !strings.Contains(log, "msg=stopping") {
		t.Errorf("serve log does not report the dropped migration and the stop:\n%s", log)
	}
	e.assertOnSource(w)
	e.assertNoImagesLeft()
	assertNoCgroup(t, r)
}

// TestFaultConnectionCut takes the link down during the transfer: neither
// side gets a FIN or RST, only silence. The source must notice (yamux
// write timeout or keepalive), roll back and remove its images; the
// destination must notice too and remove its partial migration.
func TestFaultConnectionCut(t *testing.T) {
	e, w, m, id := startBreakableMigration(t, slowLink)
	cut := time.Now()
	if out, err := exec.Command("ip", "-n", e.hosts.Dst.Name, "link", "set", "to-src", "down").CombinedOutput(); err != nil {
		t.Fatalf("cut the link: %v\n%s", err, out)
	}

	r := m.wait(60 * time.Second)
	t.Logf("migrate failed %v after the cut", time.Since(cut).Round(time.Millisecond))
	assertRolledBack(t, r, id)
	e.assertOnSource(w)
	waitDirEmpty(t, e.srcWork, 10*time.Second)
	// The destination has no peer to tell it; only its own keepalive can.
	waitDirEmpty(t, e.dstWork, 60*time.Second)
	t.Logf("destination cleaned up %v after the cut", time.Since(cut).Round(time.Millisecond))
	if log := e.readServeLog(); !strings.Contains(log, "migration failed") {
		t.Errorf("serve log does not report the failure:\n%s", log)
	}
	assertNoCgroup(t, r)
}

// TestFaultPrecopyConnectionCut takes the link down while pre-copy rounds
// run: the source must roll back with the workload running untracked (no
// write-protected mapping, no userfaultfd left in it).
func TestFaultPrecopyConnectionCut(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: slowLink})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, faultWorkload)
	w.WaitProgress(t, 3)
	m := e.startMigrate(w.PID(), "--mode", "precopy", "--tracker", "uffd-wp")
	var id string
	testenv.WaitFor(t, 60*time.Second, func() (bool, error) {
		out := m.out.String()
		if !strings.Contains(out, "phase=rounds") {
			return false, nil
		}
		if id == "" {
			id = migrationID(t, out)
		}
		return receivedBytes(e, id) >= 4<<20, nil
	})
	if strings.Contains(m.out.String(), "phase=dump") {
		t.Fatalf("pre-copy reached the dump before it could be broken: shape the link slower\n%s", m.out)
	}
	if out, err := exec.Command("ip", "-n", e.hosts.Dst.Name, "link", "set", "to-src", "down").CombinedOutput(); err != nil {
		t.Fatalf("cut the link: %v\n%s", err, out)
	}
	r := m.wait(60 * time.Second)
	assertRolledBack(t, r, id)
	e.assertOnSource(w)
	if left, err := dirty.Leftovers(w.PID()); err != nil || len(left) > 0 {
		t.Fatalf("the workload keeps tracking state after the rollback: %v (%v)", left, err)
	}
	waitDirEmpty(t, e.srcWork, 10*time.Second)
}

// TestFaultDestinationDiesMidTransfer SIGKILLs the destination service
// during the transfer: the source must roll back and fail with exit 1.
func TestFaultDestinationDiesMidTransfer(t *testing.T) {
	e, w, m, id := startBreakableMigration(t, slowLink)
	if err := e.serve.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.serveDone:
	case <-time.After(10 * time.Second):
		t.Fatal("serve survives SIGKILL for 10s")
	}

	r := m.wait(60 * time.Second)
	assertRolledBack(t, r, id)
	e.assertOnSource(w)
	waitDirEmpty(t, e.srcWork, 10*time.Second)
	assertNoCgroup(t, r)
	// Killed -9, the destination could not clean up: its journal says
	// where the migration stood, and the next service undoes it.
	left := dirNames(t, e.dstWork)
	if !slices.Contains(left, "journal/"+id+".destination.json") || !slices.Contains(left, id) {
		t.Fatalf("destination after SIGKILL holds %v: want the migration's directory and its journal entry", left)
	}
	ents, err := phaul.ReadJournal(phaul.JournalDir(e.dstWork))
	if err != nil || len(ents) != 1 || ents[0].OwnerAlive() || ents[0].Phase.Final() {
		t.Fatalf("destination journal: %+v, %v; want one unfinished entry, its owner gone", ents, err)
	}
	t.Logf("destination journal after SIGKILL: %v", ents[0])
	e.startServe()
	waitDirEmpty(t, e.dstWork, 30*time.Second)
	if !strings.Contains(e.readServeLog(), "undid an unfinished migration") {
		t.Fatalf("the new service did not say what it undid:\n%s", e.readServeLog())
	}
	assertNoCgroup(t, r)
}

// TestFaultMigrateSIGTERMDuringTransfer stops phaul migrate (as ^C or a
// service manager would) while images are on the wire: it must stop
// sending, roll back and exit 1, not first ship the rest of the images.
func TestFaultMigrateSIGTERMDuringTransfer(t *testing.T) {
	// Slower still: the whole transfer takes about half a minute.
	e, w, m, id := startBreakableMigration(t, slowLink/4)
	if err := m.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The workload resumes on the source at once: CRIU's RPC socket is
	// closed, which fails the post-dump notification.
	w.WaitProgress(t, 3)
	r := m.wait(2 * time.Minute)
	assertRolledBack(t, r, id)
	e.assertOnSource(w)
	// Told to stop, migrate must not finish the transfer nor ask for a
	// restore the destination then has to undo.
	if strings.Contains(r.out, "phase=restore") {
		t.Errorf("after SIGTERM migrate went on sending the images and asked the destination to restore them")
	}
	waitDirEmpty(t, e.srcWork, 10*time.Second)
	// The source answered post-dump with failure: the destination must
	// drop everything, not hold a copy in doubt.
	waitDirEmpty(t, e.dstWork, 30*time.Second)
	assertNoCgroup(t, r)
}

// TestFaultInDoubt loses the connection while the destination holds the
// restored tree PREPARED: phaul migrate is stopped while the destination
// restores and killed once the destination is prepared, so PREPARED never
// reaches it; its CRIU, whose post-dump notification is never answered,
// resumes the source copy (case a). In the "source lost" runs the source
// copy is killed too (the source host died): no copy runs (case b). Either
// way the destination keeps its copy held inside CRIU's restore (rebuilt,
// never run), records the migration in doubt, and keeps holding it after
// the service stops. The test then resolves it as an operator would,
// through CRIU's own copy of the service's RPC socket end: in (a) CRIU
// drops the held copy; in (b) it resumes it, and the copy must run and
// verify all of its memory. With a lazy restore (the default) the destination fills the
// held copy's memory before it records the migration in doubt: the copy
// resumes without the service's lazy-pages daemon, none of its pages
// reading as zeros.
func TestFaultInDoubt(t *testing.T) {
	eager := []string{"--lazy-restore=false"}
	for _, tc := range []struct {
		name       string
		serve      []string
		sourceLost bool
	}{
		{"eager", eager, false},
		{"lazy", nil, false},
		{"eager source lost", eager, true},
		{"lazy source lost", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) { testInDoubt(t, tc.serve, tc.sourceLost) })
	}
}

// inDoubt is one TestFaultInDoubt run once the destination holds its copy.
type inDoubt struct {
	e         *env
	w         *testenv.Workload
	id        string
	statePath string
	state     string       // the destination's state file
	src, dest int          // the source copy, the destination's held copy
	frozen    testenv.Step // the workload's last step before the dump
	resumed   bool         // case (a): the source CRIU resumed the source copy
}

func testInDoubt(t *testing.T, serve []string, sourceLost bool) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe(append([]string{"--commit-wait", "2s"}, serve...)...)
	w := testenv.StartWorkload(t, e.hosts.Src, faultWorkload)
	w.WaitProgress(t, 3)
	src := w.PID()
	m := e.startMigrate(src)
	e.stopMigrateInRestore(m)
	// The source was frozen for the dump: no step after this one can
	// come from the source unless CRIU resumes it.
	frozen, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	if sourceLost {
		syscall.Kill(src, syscall.SIGKILL) // the source host dies with migrate
	}
	m.cmd.Process.Kill()
	r := m.wait(time.Minute)
	id := migrationID(t, r.out)
	t.Cleanup(func() { removeCgroup(t, id) }) // kills the held copy and its CRIU
	if strings.Contains(r.out, "phase=prepared") {
		// Stopped too late: PREPARED reached migrate, which may have
		// sent COMMIT. Not seen: the restore outlasts the poll by far.
		waitServeLog(t, e, regexp.MustCompile(`committed: tree runs|msg="migration in doubt`), time.Minute, nil)
		if strings.Contains(e.readServeLog(), "committed: tree runs") {
			t.Skipf("SKIP: race lost: PREPARED reached migrate before it was stopped, and it committed\n%s", r.out)
		}
	}
	d := &inDoubt{e: e, w: w, id: id, src: src, frozen: frozen,
		statePath: filepath.Join(e.dstWork, id, "state")}
	d.waitState(t)
	d.waitSource(t)
	if sourceLost && d.resumed {
		t.Fatalf("the source copy %d runs after it was killed", src)
	}
	d.assertHeld(t, "in doubt")
	w.CheckHealthy(t)

	// The service's shutdown leaves the copy as it is: held, recorded.
	if err := e.serve.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.serveDone:
	case <-time.After(30 * time.Second):
		t.Fatalf("serve still runs 30s after SIGTERM\n%s", e.readServeLog())
	}
	if code := e.serve.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("serve exited %d after SIGTERM, want 0\n%s", code, e.readServeLog())
	}
	d.assertHeld(t, "after serve stopped")
	if b, err := os.ReadFile(d.statePath); err != nil || string(b) != d.state {
		t.Fatalf("after serve stopped: %s: %q, %v; was %q", d.statePath, b, err, d.state)
	}
	w.CheckHealthy(t)
	d.resolve(t)
	// Killed -9, migrate could not remove its images: a job for a future
	// `phaul gc` on the source. Its journal says where it stopped.
	if left := dirNames(t, e.srcWork); len(left) > 0 {
		t.Logf("source leftover for phaul gc: %s/%v", e.srcWork, left)
	}
	ents, err := phaul.ReadJournal(phaul.JournalDir(e.srcWork))
	// migrate was stopped while the destination restored, then killed.
	if err != nil || len(ents) != 1 || ents[0].ID != id || ents[0].OwnerAlive() ||
		(ents[0].Phase != phaul.PhaseRestore && ents[0].Phase != phaul.PhasePrepared) {
		t.Fatalf("source journal after migrate was killed: %+v, %v; want one entry of %s at restore or prepared, owner gone", ents, err, id)
	}
	t.Logf("source journal: %v", ents[0])
}

// waitState waits until the destination noticed the lost connection and
// recorded the migration in doubt, its copy's memory complete.
func (d *inDoubt) waitState(t *testing.T) {
	t.Helper()
	testenv.WaitFor(t, 30*time.Second, func() (bool, error) {
		// The log line follows the final state (a lazy restore's
		// state says memory=filling first): read it first.
		logged := strings.Contains(d.e.readServeLog(), "migration in doubt")
		b, err := os.ReadFile(d.statePath)
		d.state = string(b)
		return logged && err == nil, nil
	})
	if !strings.HasPrefix(d.state, "in-doubt ") || !strings.Contains(d.state, " memory=complete ") {
		t.Fatalf("%s: %q, want in-doubt pid=… criu=… criu_rpc_fd=… cgroup=… memory=complete …", d.statePath, d.state)
	}
	d.dest = stateInt(t, d.state, "pid")
}

// waitSource finds out what the source CRIU did: resumed its copy (a) or
// killed it (b).
func (d *inDoubt) waitSource(t *testing.T) {
	t.Helper()
	testenv.WaitFor(t, 30*time.Second, func() (bool, error) {
		if !slices.Contains(d.w.Running(t), d.src) {
			return true, nil
		}
		last, err := d.w.LastStep()
		d.resumed = err == nil && last.N >= d.frozen.N+3
		return d.resumed, err
	})
	if d.resumed {
		t.Logf("case (a): the source CRIU lost its RPC socket before answering post-dump and resumed pid %d", d.src)
		if in, err := d.e.hosts.Src.Contains(d.src); err != nil || !in {
			t.Fatalf("pid %d is not in the source namespace: %v", d.src, err)
		}
		d.w.WaitProgress(t, 5)
	} else {
		t.Logf("case (b): the source copy %d is gone", d.src)
	}
}

// assertHeld checks that the destination's copy is held inside the restore
// of the CRIU the state names, in phaul/<id>, and that no other copy runs
// but the source's in case (a).
func (d *inDoubt) assertHeld(t *testing.T, when string) {
	t.Helper()
	w, dest := d.w, d.dest
	if !slices.Contains(w.Running(t), dest) {
		t.Fatalf("%s: the in-doubt copy %d does not exist; copies: %v; cgroup: %v; threads:\n%s", when, dest, w.Running(t), cgroupProcs(t, d.id), threadReport(dest))
	}
	if in, err := d.e.hosts.Dst.Contains(dest); err != nil || !in {
		t.Fatalf("%s: pid %d is not in the destination namespace: %v", when, dest, err)
	}
	if criuPID := stateInt(t, d.state, "criu"); !heldInRestore(t, dest) || !isCRIU(criuPID) {
		t.Fatalf("%s: the in-doubt copy %d is not held inside the restore of the CRIU the state names (%q): threads %q, criu alive %v",
			when, dest, d.state, threadStates(t, dest), isCRIU(criuPID))
	}
	if procs := cgroupProcs(t, d.id); !slices.Contains(procs, dest) {
		t.Fatalf("%s: the in-doubt copy %d is not in cgroup phaul/%s: %v", when, dest, d.id, procs)
	}
	running := runningCopies(t, w)
	switch {
	case d.resumed && !slices.Equal(running, []int{d.src}):
		t.Fatalf("%s: want only the source %d running, got %v", when, d.src, running)
	case !d.resumed && len(running) != 0:
		t.Fatalf("%s: the source copy is gone and the destination's is in doubt, yet %v run", when, running)
	}
	if !d.resumed {
		if last, err := w.LastStep(); err != nil || last.N != d.frozen.N {
			t.Fatalf("%s: the workload stepped from %d to %d with no copy running (%v)", when, d.frozen.N, last.N, err)
		}
	}
}

// resolve answers the post-restore notification the destination's CRIU
// holds its copy in, as an operator's tool would: through CRIU's copy of
// the service's RPC socket end (criu_rpc_fd), taken with pidfd_getfd. In
// case (a) the source copy runs, so CRIU drops the held one; otherwise the
// held copy is the only one, and it resumes, runs where it was restored
// and verifies all of its memory twice.
func (d *inDoubt) resolve(t *testing.T) {
	t.Helper()
	criuPID := stateInt(t, d.state, "criu")
	restoreLog := filepath.Join(d.e.dstWork, d.id, "restore.log")
	resp := answerCRIU(t, criuPID, stateInt(t, d.state, "criu_rpc_fd"), !d.resumed, restoreLog)
	if resp.GetType() != rpc.CriuReqType_RESTORE || resp.GetSuccess() == d.resumed {
		t.Fatalf("criu answered %v success=%v; want RESTORE, success %v", resp.GetType(), resp.GetSuccess(), !d.resumed)
	}
	want := []int{d.dest}
	if d.resumed {
		want = []int{d.src}
	}
	deadline := time.Now().Add(30 * time.Second)
	testenv.WaitFor(t, time.Minute, func() (bool, error) {
		running := runningCopies(t, d.w)
		if !isCRIU(criuPID) && slices.Equal(running, want) {
			return true, nil
		}
		if time.Now().After(deadline) {
			return false, fmt.Errorf("30s after the answer: criu %d alive %v, copies running %v, want %v; copy %d threads:\n%s\nrestore.log:\n%s",
				criuPID, isCRIU(criuPID), running, want, d.dest, threadReport(d.dest), logTail(restoreLog))
		}
		return false, d.w.Health()
	})
	if d.resumed {
		if slices.Contains(d.w.Running(t), d.dest) {
			t.Fatalf("dropped copy %d still exists", d.dest)
		}
		d.w.WaitProgress(t, 3)
		t.Logf("CRIU dropped the held copy %d; the source copy %d runs", d.dest, d.src)
		return
	}
	if in, err := d.e.hosts.Dst.Contains(d.dest); err != nil || !in {
		t.Fatalf("resumed copy %d is not in the destination namespace: %v", d.dest, err)
	}
	testenv.WaitFor(t, time.Minute, func() (bool, error) {
		last, err := d.w.LastStep()
		if err == nil {
			err = d.w.Health()
		}
		return last.Verified >= d.frozen.Verified+2, err
	})
	d.w.CheckHealthy(t)
	last, _ := d.w.LastStep()
	t.Logf("resumed the held copy %d: steps %d to %d, memory verified %d times", d.dest, d.frozen.N, last.N, last.Verified-d.frozen.Verified)
}

// logTail returns the last lines of the file at path, or why not.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

// answerCRIU answers the post-restore notification CRIU (criuPID) holds
// its tree in, with success if resume, as an operator's tool would: through
// CRIU's descriptor fd, a copy of its RPC peer's end (pidfd_getfd). It
// answers the notifications that follow (pre-resume, post-resume) with
// success and returns CRIU's final answer to the restore request (its log
// at logPath tells why there is none).
func answerCRIU(t *testing.T, criuPID, fd int, resume bool, logPath string) *rpc.CriuResp {
	t.Helper()
	resp, err := criu.AnswerHeld(criuPID, fd, resume, time.Minute)
	if err != nil {
		t.Fatalf("%v; restore.log:\n%s", err, logTail(logPath))
	}
	t.Logf("criu %d answered %v success=%v", criuPID, resp.GetType(), resp.GetSuccess())
	return resp
}

// stopMigrateInRestore stops migrate (SIGSTOP) while the destination
// restores: after the RESTORE request reached the destination, which then
// logs its restore's start (the lazy marking, CRIU's pre-restore script),
// and before PREPARED can come back, which takes the restore's tens of
// milliseconds at least. Stopped, migrate can neither answer its CRIU's
// post-dump notification nor send COMMIT. It returns once the destination
// is prepared.
func (e *env) stopMigrateInRestore(m *bgMigrate) {
	e.t.Helper()
	waitServeLog(e.t, e, regexp.MustCompile(`msg="lazy restore"|script=pre-restore|phase=restore`), 2*time.Minute, m)
	stopProcess(m.cmd.Process.Pid)
	waitServeLog(e.t, e, regexp.MustCompile(`msg=phase .*phase=prepared`), time.Minute, m)
}

// waitServeLog polls the serve log every millisecond until re matches it,
// for at most timeout (the tight poll for races the test must win), and
// fails if m (if not nil) exits first.
func waitServeLog(t testing.TB, e *env, re *regexp.Regexp, timeout time.Duration, m *bgMigrate) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !re.MatchString(e.readServeLog()); {
		if m != nil {
			select {
			case <-m.done:
				t.Fatalf("migrate exited %d before the serve log showed %q\n%s", m.cmd.ProcessState.ExitCode(), re, m.out)
			default:
			}
		}
		if time.Now().After(deadline) {
			out := "(none)"
			if m != nil {
				out = m.out.String()
			}
			t.Fatalf("serve log: no %q after %v\n%s\nmigrate output:\n%s", re, timeout, e.readServeLog(), out)
		}
		time.Sleep(time.Millisecond) // a poll interval against the deadline
	}
}

// stopProcess sends SIGSTOP to pid and waits, for at most 10 seconds,
// until every thread of it is stopped (or it is gone).
func stopProcess(pid int) {
	syscall.Kill(pid, syscall.SIGSTOP)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return // gone: nothing runs
		}
		stopped := true
		for _, task := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			i := bytes.LastIndexByte(b, ')')
			if err == nil && (i < 0 || i+2 >= len(b) || b[i+2] != 'T') {
				stopped = false
			}
		}
		if stopped {
			return
		}
		time.Sleep(time.Millisecond) // a poll interval against the deadline
	}
}

// bgMigrate is phaul migrate running in the background in the source
// namespace.
type bgMigrate struct {
	t         testing.TB
	cmd       *exec.Cmd
	out       *outputBuffer
	statsPath string
	done      chan struct{} // closed once migrate exited and its output is read
}

// startMigrate starts phaul migrate for pid. Cleanup kills it if it still
// runs.
func (e *env) startMigrate(pid int, extra ...string) *bgMigrate {
	e.t.Helper()
	m := &bgMigrate{t: e.t, statsPath: filepath.Join(e.dir, fmt.Sprintf("stats-%d.json", time.Now().UnixNano())),
		done: make(chan struct{})}
	args := append([]string{"--log-level", "debug", "migrate", "--to", e.destAddr(), "--tls-dir", e.srcTLS,
		"--work-dir", e.srcWork, "--stats-json", m.statsPath}, extra...)
	args = append(args, strconv.Itoa(pid))
	m.cmd = e.hosts.Src.Command(context.Background(), e.bin, args...)
	m.out = &outputBuffer{}
	m.cmd.Stdout, m.cmd.Stderr = m.out, m.out
	m.cmd.WaitDelay = 10 * time.Second // bounds reading output held by a child
	if err := m.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { // owned by m; cleanup waits for it
		m.cmd.Wait()
		close(m.done)
	}()
	e.t.Cleanup(func() {
		select {
		case <-m.done:
		default:
			m.cmd.Process.Kill()
			<-m.done
		}
		if e.t.Failed() {
			e.t.Logf("serve log:\n%s", e.readServeLog())
		}
	})
	return m
}

// waitTransfer waits until migrate logged phase=dump (pages stream while
// CRIU dumps) and the
// destination holds at least 4 MiB of its images, and returns the
// migration id.
func (m *bgMigrate) waitTransfer(e *env) string {
	m.t.Helper()
	const some = 4 << 20
	var id string
	testenv.WaitFor(m.t, 60*time.Second, func() (bool, error) {
		select {
		case <-m.done:
			return false, fmt.Errorf("migrate exited %d before the transfer was under way\n%s",
				m.cmd.ProcessState.ExitCode(), m.out)
		default:
		}
		out := m.out.String()
		// Pages stream to the destination while CRIU dumps.
		if !strings.Contains(out, "phase=dump") {
			return false, nil
		}
		if id == "" {
			id = migrationID(m.t, out)
			// Whatever the destination leaves, the test removes.
			m.t.Cleanup(func() { removeCgroup(m.t, id) })
		}
		return receivedBytes(e, id) >= some, nil
	})
	got := receivedBytes(e, id)
	m.t.Logf("migration %s: destination received %d bytes; breaking it now", id, got)
	if strings.Contains(m.out.String(), "phase=transfer") {
		m.t.Fatalf("the page stream finished before it could be broken: shape the link slower\n%s", m.out)
	}
	return id
}

// wait waits for migrate to exit and returns its result.
func (m *bgMigrate) wait(timeout time.Duration) result {
	m.t.Helper()
	select {
	case <-m.done:
	case <-time.After(timeout):
		m.cmd.Process.Kill()
		<-m.done
		m.t.Fatalf("migrate still ran after %v\n%s", timeout, m.out)
	}
	r := result{out: m.out.String(), code: m.cmd.ProcessState.ExitCode()}
	if b, err := os.ReadFile(m.statsPath); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			r.stats = map[string]any{}
			if err := json.Unmarshal(sc.Bytes(), &r.stats); err != nil {
				m.t.Fatalf("stats json: %v\n%s", err, b)
			}
		}
	}
	m.t.Logf("phaul migrate exit %d (%v)\n%s", r.code, m.cmd.ProcessState, r.out)
	checkPhases(m.t, r)
	return r
}

// outputBuffer collects a process's output; safe for concurrent use.
type outputBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

func (w *outputBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *outputBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// assertRolledBack checks migrate's result after a failure before PREPARED:
// exit 1, a one-line error saying the workload resumed, stats saying failed.
func assertRolledBack(t testing.TB, r result, id string) {
	t.Helper()
	last := lastLine(r.out)
	if r.code != 1 {
		t.Fatalf("migrate exit %d, want 1 (failed, workload on the source): %s", r.code, last)
	}
	if !strings.HasPrefix(last, "phaul: ") || !strings.Contains(last, "resumed on the source") {
		t.Fatalf("error line %q does not say the workload resumed on the source", last)
	}
	if r.str("result") != "failed" || r.str("migration_id") != id {
		t.Fatalf("stats: result %q, migration %q; want failed, %s", r.str("result"), r.str("migration_id"), id)
	}
	t.Logf("migrate: %s", last)
}

var migrationIDRe = regexp.MustCompile(`migration=([0-9a-f]{16})\b`)

// migrationID returns the first migration id in a phaul log.
func migrationID(t testing.TB, log string) string {
	t.Helper()
	m := migrationIDRe.FindStringSubmatch(log)
	if m == nil {
		t.Fatalf("no migration=<id> in the log:\n%s", log)
	}
	return m[1]
}

// stateInt returns the positive number named key= (pid, criu,
// criu_rpc_fd) in a destination state file's in-doubt line.
func stateInt(t testing.TB, state, key string) int {
	t.Helper()
	for _, f := range strings.Fields(state) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			if pid, err := strconv.Atoi(v); err == nil && pid > 0 {
				return pid
			}
		}
	}
	t.Fatalf("state %q names no %s", state, key)
	return 0
}

// dirBytes returns the size of the regular files under dir (0 if none).
// startBreakableMigration starts a fault workload, a destination behind a
// link shaped to rate and a background migrate, and returns once the page
// stream is under way (waitTransfer), ready to be broken.
func startBreakableMigration(t *testing.T, rate int64) (*env, *testenv.Workload, *bgMigrate, string) {
	t.Helper()
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: rate})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, faultWorkload)
	w.WaitProgress(t, 3)
	// Cold: the transfer under test is CRIU's dump streaming pages.
	m := e.startMigrate(w.PID(), "--mode", "cold")
	return e, w, m, m.waitTransfer(e)
}

// receivedBytes is what the destination holds for migration id: its files,
// and the page store's spool, which is unlinked once open (counted through
// the serve process's open files).
func receivedBytes(e *env, id string) int64 {
	dir := filepath.Join(e.dstWork, id)
	n := dirBytes(dir)
	if e.serve == nil || e.serve.Process == nil {
		return n
	}
	fds := fmt.Sprintf("/proc/%d/fd", e.serve.Process.Pid)
	ents, _ := os.ReadDir(fds)
	for _, ent := range ents {
		target, err := os.Readlink(filepath.Join(fds, ent.Name()))
		if err != nil || !strings.HasPrefix(target, dir) || !strings.HasSuffix(target, "(deleted)") {
			continue
		}
		if fi, err := os.Stat(filepath.Join(fds, ent.Name())); err == nil {
			n += fi.Size()
		}
	}
	return n
}

func dirBytes(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil // files come and go while we walk
	})
	return n
}

// dirNames lists a work dir, nil if it does not exist. Its journal
// directory, phaul's own, counts by its entries: journal/<entry> each.
func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if e.Name() == "journal" && e.IsDir() {
			js, err := os.ReadDir(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			for _, j := range js {
				names = append(names, "journal/"+j.Name())
			}
			continue
		}
		names = append(names, e.Name())
	}
	return names
}

// waitDirEmpty waits until dir is empty or gone.
func waitDirEmpty(t testing.TB, dir string, timeout time.Duration) {
	t.Helper()
	ok := false
	deadline := time.Now().Add(timeout)
	testenv.WaitFor(t, timeout+time.Second, func() (bool, error) {
		ok = len(dirNames(t, dir)) == 0
		return ok || time.Now().After(deadline), nil
	})
	if !ok {
		t.Fatalf("%s still holds %v after %v", dir, dirNames(t, dir), timeout)
	}
}

// threadStates returns the state letter of each thread of pid, as in
// /proc/PID/task/TID/stat ("TTT": three stopped threads).
func threadStates(t testing.TB, pid int) string {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	var states strings.Builder
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // the thread just exited
		}
		if err != nil {
			t.Fatal(err)
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) {
			t.Fatalf("/proc/%d/task/%s/stat: %q", pid, task.Name(), b)
		}
		states.WriteByte(b[i+2])
	}
	return states.String()
}

// runningCopies returns the copies of w that run: not stopped (a thread
// in a state other than T or t) and not held inside a CRIU restore.
func runningCopies(t testing.TB, w *testenv.Workload) []int {
	t.Helper()
	var pids []int
	for _, pid := range w.Running(t) {
		if strings.Trim(threadStates(t, pid), "Tt") != "" && !heldInRestore(t, pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// heldInRestore reports whether the workload copy pid waits inside a CRIU
// restore that has not resumed it: every thread blocked in futex(2) (CRIU's
// restorer waits for its next stage there), where a running workload's
// main thread waits in rt_sigtimedwait.
func heldInRestore(t testing.TB, pid int) bool {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, task := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/syscall", pid, task.Name()))
		if f := strings.Fields(string(b)); err != nil || len(f) == 0 || f[0] != "202" { // futex on x86_64
			return false
		}
	}
	return true
}

// isCRIU reports whether pid is a CRIU swrk child (phaul's RPC). Its
// command line may start with a loader (deploy/install-criu.sh's wrapper
// runs CRIU through its own ld.so).
func isCRIU(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(b, []byte("criu")) && bytes.Contains(b, []byte("\x00swrk\x003\x00"))
}

// cgroupProcs lists the processes in phaul/<id> in the freezer hierarchy,
// or in cgroup v2 if it is not mounted.
func cgroupProcs(t testing.TB, id string) []int {
	t.Helper()
	var b []byte
	var err error
	for _, root := range []string{"/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		b, err = os.ReadFile(filepath.Join(root, "phaul", id, "cgroup.procs"))
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("cgroup phaul/%s: %v", id, err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("cgroup phaul/%s: bad pid %q", id, f)
		}
		pids = append(pids, pid)
	}
	return pids
}

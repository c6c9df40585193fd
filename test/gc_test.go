package test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/images"
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

	t.Setenv("PHAUL_FAULT_AT", "source:commit:kill")
	m := e.startMigrate(src, "--mode", "postcopy")
	r := m.wait(2 * time.Minute)
	if ps := m.cmd.ProcessState; ps.Success() || !strings.Contains(ps.String(), "killed") {
		t.Fatalf("migrate: %v, want killed by its fault hook at commit\n%s", ps, r.out)
	}
	t.Setenv("PHAUL_FAULT_AT", "")
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
	if code != 0 || !strings.Contains(out, "done: let the source tree go") {
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

// TestGCDumpLeftovers, in the spirit of CRIU's zdtm gc tests: a tree holding
// an open file whose name was unlinked (a second hard link keeps it) and an
// established TCP connection is dumped by CRIU itself with --link-remap
// and --tcp-established; the dump kills the tree and the restore never
// happens. CRIU leaves its link_remap.N beside the file and its nftables
// lock, which drops the connection's packets. `phaul gc --images-dir
// --show` lists both and removes nothing; `phaul gc --images-dir` removes
// them, the connection's packets flow again (a SYN on its 4-tuple is
// answered), and a second --show finds nothing.
func TestGCDumpLeftovers(t *testing.T) {
	testenv.RequireRoot(t)
	criu := testenv.RequireCRIU(t)
	e := newEnv(t, testenv.HostsOpts{})
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 8, PagesPerSec: 200, TCPPair: true, GhostLink: true})
	w.WaitProgress(t, 3)
	local, remote := tcpPairPorts(t, w.PID())
	anchor := e.srcAnchor()

	dump := filepath.Join(e.dir, "dump")
	if err := os.Mkdir(dump, 0o700); err != nil {
		t.Fatal(err)
	}
	out, err := e.hosts.Src.Command(context.Background(), criu, "dump", "-t", strconv.Itoa(w.PID()), "-D", dump,
		"--tcp-established", "--link-remap", "--network-lock", "nftables", "-o", "dump.log", "-v4").CombinedOutput()
	if err != nil {
		t.Fatalf("criu dump: %v\n%s\n%s", err, out, logTail(filepath.Join(dump, "dump.log")))
	}
	w.WaitExit(t, 10*time.Second)
	remaps, _ := filepath.Glob(filepath.Join(w.Dir, "link_remap.*"))
	inv, err := images.ReadInventory(dump)
	if len(remaps) != 1 || err != nil {
		t.Fatalf("after the dump: link remaps %v, inventory %v; want one remap", remaps, err)
	}
	table := images.NftLockTable(inv.RunID)
	if !hasTable(t, anchor, table) {
		t.Fatalf("after the dump: no lock table %s in the source netns", table)
	}
	if err := synAnswered(t, e.hosts.Src, local, remote); err == nil {
		t.Fatalf("a SYN on the locked connection's 4-tuple was answered before gc")
	}

	out2, code := e.phaul(e.hosts.Src, "gc", "--images-dir", dump, "--show")
	t.Logf("gc --show:\n%s", out2)
	if code != 1 || !strings.Contains(out2, "link-remap") || !strings.Contains(out2, table) {
		t.Fatalf("gc --show: exit %d, want 1 listing the link remap and %s\n%s", code, table, out2)
	}
	if _, err := os.Stat(remaps[0]); err != nil || !hasTable(t, anchor, table) {
		t.Fatalf("gc --show removed something: remap %v, table there %v", err, hasTable(t, anchor, table))
	}
	out2, code = e.phaul(e.hosts.Src, "gc", "--images-dir", dump)
	t.Logf("gc:\n%s", out2)
	if code != 0 {
		t.Fatalf("gc: exit %d\n%s", code, out2)
	}
	if _, err := os.Stat(remaps[0]); !errors.Is(err, fs.ErrNotExist) || hasTable(t, anchor, table) {
		t.Fatalf("after gc: remap %v, table there %v", err, hasTable(t, anchor, table))
	}
	if err := synAnswered(t, e.hosts.Src, local, remote); err != nil {
		t.Fatalf("after gc the connection's 4-tuple still gets no answer: %v", err)
	}
	if out2, code := e.phaul(e.hosts.Src, "gc", "--images-dir", dump, "--show"); code != 0 || !strings.Contains(out2, "nothing left over") {
		t.Fatalf("second gc --show: exit %d\n%s", code, out2)
	}
}

// tcpPairPorts returns the 4-tuple's ports of pid's established loopback
// TCP pair as one of its ends sees it (local, remote), from
// /proc/PID/net/tcp: the lock drops that tuple's packets either way.
func tcpPairPorts(t *testing.T, pid int) (local, remote int) {
	t.Helper()
	var ports [][2]int
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
		if err != nil {
			return false, err
		}
		ports = nil
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 4 || f[3] != "01" || !strings.HasPrefix(f[1], "0100007F:") || !strings.HasPrefix(f[2], "0100007F:") {
				continue
			}
			l, _ := strconv.ParseInt(f[1][9:], 16, 32)
			r, _ := strconv.ParseInt(f[2][9:], 16, 32)
			ports = append(ports, [2]int{int(l), int(r)})
		}
		return len(ports) == 2, nil
	})
	return ports[0][0], ports[0][1]
}

// synAnswered dials from 127.0.0.1:local to 127.0.0.1:remote inside ns,
// with a listener on remote there: nil if the handshake completes within a
// second (no lock drops the tuple's packets).
func synAnswered(t *testing.T, ns *testenv.Netns, local, remote int) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine, in ns
		f, err := os.Open(ns.Path())
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		lc := net.ListenConfig{Control: reuseAddr}
		ln, err := lc.Listen(context.Background(), "tcp4", fmt.Sprintf("127.0.0.1:%d", remote))
		if err != nil {
			errc <- fmt.Errorf("listen: %w", err)
			return
		}
		defer ln.Close()
		d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: local}, Control: reuseAddr}
		c, err := d.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", remote))
		if err == nil {
			c.Close()
		}
		errc <- err
	}()
	return <-errc
}

func reuseAddr(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
	return errors.Join(err, serr)
}

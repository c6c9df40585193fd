package phaul

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
	"golang.org/x/sys/unix"
)

// TestGCStrayCRIU: a CRIU working in a migration's directory of the work
// dir whose migration has no journal entry is listed, and killed by gc
// (it holds no process); with the migration's entry present it is the
// entry's, not a stray.
func TestGCStrayCRIU(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.RequireCRIU(t)
	work := t.TempDir()
	const id = "0123456789abcdef"
	dir := filepath.Join(work, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	local, remote, err := linux.SeqpacketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	cmd := exec.Command(bin, "swrk", "3") // waits for requests on fd 3
	cmd.Dir, cmd.ExtraFiles = dir, []*os.File{remote}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	remote.Close()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		cwd, _ := os.Readlink("/proc/" + itoa(cmd.Process.Pid) + "/cwd")
		return cwd == dir && isCRIU(cmd.Process.Pid), nil
	})

	j, err := openJournal(JournalDir(work), id, RoleSource, JournalEntry{Phase: PhaseRounds})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := GC(work, GCOptions{})
	if err != nil || len(rep.Leftovers) != 0 {
		t.Fatalf("with its migration's entry present: %+v, %v; want no stray", rep.Leftovers, err)
	}
	if err := j.remove(); err != nil {
		t.Fatal(err)
	}
	rep, err = GC(work, GCOptions{})
	if err != nil || len(rep.Leftovers) != 1 || rep.Leftovers[0].Kind != "criu" || !strings.HasPrefix(rep.Leftovers[0].Action, "kill") {
		t.Fatalf("GC --show: %+v, %v; want one stray criu to kill", rep.Leftovers, err)
	}
	if _, err := GC(work, GCOptions{Apply: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the stray criu still runs after gc")
	}
	if rep, err := GC(work, GCOptions{}); err != nil || len(rep.Leftovers) != 0 {
		t.Fatalf("second gc: %+v, %v; want nothing", rep.Leftovers, err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestGCTrackerLeftovers: a userfaultfd in a running task of a migration's
// tree (a tracker killed while injecting leaves one) is listed by gc.
func TestGCTrackerLeftovers(t *testing.T) {
	if os.Getenv("PHAUL_TEST_UFFD_CHILD") == "1" {
		if _, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC, 0, 0); errno != 0 {
			os.Exit(3)
		}
		os.Stdout.WriteString("ready\n")
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	testenv.RequireRoot(t)
	cmd := exec.Command(os.Args[0], "-test.run", "^TestGCTrackerLeftovers$")
	cmd.Env = append(os.Environ(), "PHAUL_TEST_UFFD_CHILD=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	buf := make([]byte, 6)
	if n, err := io.ReadFull(out, buf); err != nil || string(buf[:n]) != "ready\n" {
		t.Skipf("SKIP: the child cannot create a userfaultfd here: %q, %v", buf[:n], err)
	}
	st, err := linux.ReadProcessStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	if err := os.MkdirAll(JournalDir(work), 0o700); err != nil {
		t.Fatal(err)
	}
	e := JournalEntry{ID: "00000000000000f6", Role: RoleSource, Phase: PhaseRounds, Owner: 1 << 30,
		OwnerStart: st.StartTicks + 1, Root: cmd.Process.Pid}
	b, _ := json.Marshal(e)
	if err := os.WriteFile(entryPath(JournalDir(work), e.ID, e.Role), b, 0o600); err != nil {
		t.Fatal(err)
	}
	rep, err := GC(work, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(rep.Leftovers, func(l Leftover) bool { return l.Kind == "tracker" })
	if i < 0 || !strings.Contains(rep.Leftovers[i].What, "userfaultfd") {
		t.Fatalf("gc --show: %+v; want the child's userfaultfd listed", rep.Leftovers)
	}
	// Listed, never acted on: the entry stays until it is gone.
	if _, err := GC(work, GCOptions{Apply: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(entryPath(JournalDir(work), e.ID, e.Role)); err != nil {
		t.Fatalf("the entry of a tree with tracker state left: %v", err)
	}
}

// TestGCStrayLimitGroups: an empty limits group with no journal entry (a
// capped tree that exited) is listed and removed once old enough; one that
// holds a process caps a running tree and is not listed.
func TestGCStrayLimitGroups(t *testing.T) {
	testenv.RequireRoot(t)
	const empty, busy = "0123456789abc001", "0123456789abc002"
	mk := func(id string) *cgroup.Group {
		g, err := cgroup.CreateLimited(limitsGroupName(id), cgroup.Limits{PidsMax: 16})
		if err != nil {
			t.Skipf("SKIP: no pids controller to limit with: %v", err)
		}
		t.Cleanup(func() { g.Kill(5 * time.Second); g.Remove() })
		return g
	}
	mk(empty)
	g := mk(busy)
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if err := g.Add(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	names := func(plan []Leftover) (ids []string) {
		for _, l := range plan {
			ids = append(ids, l.Migration)
		}
		return ids
	}
	if plan := strayLimitGroups(nil); len(plan) != 0 {
		t.Fatalf("groups younger than %v listed: %v", staleLimitsAge, names(plan))
	}
	defer func(old time.Duration) { staleLimitsAge = old }(staleLimitsAge)
	staleLimitsAge = 0
	if plan := strayLimitGroups([]JournalEntry{{ID: empty}}); len(plan) != 0 {
		t.Fatalf("a group whose migration has an entry listed: %v", names(plan))
	}
	plan := strayLimitGroups(nil)
	if ids := names(plan); !slices.Equal(ids, []string{empty}) {
		t.Fatalf("stray limits groups %v, want only %s", ids, empty)
	}
	applyAll(plan, true, slog.New(slog.DiscardHandler))
	if _, err := cgroup.Open(limitsGroupName(empty)); err == nil {
		t.Fatal("the empty group is still there after gc")
	}
	if _, err := cgroup.Open(limitsGroupName(busy)); err != nil {
		t.Fatalf("the busy group went: %v", err)
	}
}

// fakeHelper stands in for a lazy-pages helper in TestGCStrayHelpers: the
// test binary re-executed as "phaul lazy-pages", holding a userfaultfd if
// asked, until killed.
func init() {
	mode := os.Getenv("PHAUL_TEST_FAKE_HELPER")
	if mode == "" {
		return
	}
	if mode == "uffd" {
		if _, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC, 0, 0); errno != 0 {
			os.Exit(3)
		}
	}
	os.Stdout.WriteString("ready\n")
	time.Sleep(time.Minute)
	os.Exit(0)
}

// TestGCStrayHelpers: a lazy-pages helper working in a migration's
// directory whose migration has no entry is listed; one without
// userfaultfds is killed, one holding them (its tree's missing pages
// would read as zeros) is left; with the entry present neither is a stray.
func TestGCStrayHelpers(t *testing.T) {
	testenv.RequireRoot(t)
	work := t.TempDir()
	const id = "0123456789abcd01"
	dir := filepath.Join(work, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	start := func(mode string) (*exec.Cmd, chan struct{}) {
		cmd := &exec.Cmd{Path: os.Args[0], Args: []string{"phaul", "lazy-pages"}, Dir: dir,
			Env: append(os.Environ(), "PHAUL_TEST_FAKE_HELPER="+mode)}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 6)
		if n, err := io.ReadFull(out, buf); err != nil || string(buf[:n]) != "ready\n" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Skipf("SKIP: the fake helper (%s) did not start: %q, %v", mode, buf[:n], err)
		}
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		t.Cleanup(func() { cmd.Process.Kill(); <-done })
		return cmd, done
	}
	plain, plainDone := start("plain")
	holding, holdingDone := start("uffd")
	if !isLazyHelper(plain.Process.Pid) || userfaultfds(holding.Process.Pid) != 1 {
		t.Fatalf("fake helpers not seen as such: helper %v, userfaultfds %d", isLazyHelper(plain.Process.Pid), userfaultfds(holding.Process.Pid))
	}

	j, err := openJournal(JournalDir(work), id, RoleDestination, JournalEntry{Phase: PhasePostcopy})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := GC(work, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range rep.Leftovers {
		if l.Kind == "lazy-pages" {
			t.Fatalf("with its migration's entry present a helper was listed: %+v", l)
		}
	}
	if err := j.remove(); err != nil {
		t.Fatal(err)
	}
	rep, err = GC(work, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var kill, left int
	for _, l := range rep.Leftovers {
		switch {
		case l.Kind != "lazy-pages":
		case strings.HasPrefix(l.Action, "kill"):
			kill++
		case l.Action == "" && strings.Contains(l.Why, "userfaultfds"):
			left++
		}
	}
	if kill != 1 || left != 1 {
		t.Fatalf("gc --show: %+v; want one helper to kill and one left for its userfaultfds", rep.Leftovers)
	}
	if _, err := GC(work, GCOptions{Apply: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-plainDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the stray helper without userfaultfds still runs after gc")
	}
	select {
	case <-holdingDone:
		t.Fatal("gc killed a helper that holds userfaultfds")
	default:
	}
}

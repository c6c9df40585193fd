package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// WorkloadOpts configures StartWorkload. Zero fields take the defaults shown.
type WorkloadOpts struct {
	MiB         int           // verified anonymous memory; 0: 64
	Threads     int           // dirtying threads; 0: 2
	PagesPerSec int           // pages dirtied per second by all threads; 0: 1000, <0: none
	Verify      time.Duration // period of full verification (ms resolution); 0: 250ms
	TCPPair     bool          // an established 127.0.0.1 TCP pair; CRIU needs --tcp-established
	Flock       bool          // holds flock on Workload.FlockPath; CRIU needs --file-locks
	FlockDir    string        // directory of the lock file; "": the workload's own directory
	Ghost       bool          // an open, unlinked file: a ghost file in CRIU's images
	GhostKiB    int           // its size; 0: 64. Over 1024 CRIU needs --ghost-limit
	GhostLink   bool          // Ghost, but a second hard link keeps nlink 1; CRIU needs --link-remap
	ExtUnix     string        // UnixSink.Path, a peer outside the tree; CRIU needs --ext-unix-sk
	Shm         bool          // the memory is MAP_SHARED anonymous instead of private
	// Fill is the pages' content, checked the same way in every mode:
	// "random" ("": incompressible), "text" (compressible, zstd -1 about
	// 6x) or "zero" (9 pages in 10 all zeros). See workload.c.
	Fill string
	// InSession starts the workload as a job of a stand-in shell, which
	// leads the session and stays outside the dumped tree, so CRIU needs
	// --shell-job. The shell is in the test's PID namespace: CRIU refuses
	// a session leader outside the tree's, and the test's own session
	// leader may be (CI runs the tests in a PID namespace of their own).
	InSession bool
	// Children makes the workload a tree: it forks this many children
	// after filling its memory (copy-on-write shared, no exec), each
	// verifying its own copy and logging to Log.child<i> (Workload.Child).
	Children int
	// Zombie forks a child that exits at once and is never reaped: the
	// tree holds a zombie.
	Zombie bool
	// Memfd maps a memfd MAP_PRIVATE, half of it written through the
	// mapping, and checks both halves (CRIU's lazy dump cannot take it).
	Memfd bool
	// UntouchedMiB maps that much more memory that the workload never
	// touches (logged as "untouched region=0xADDR pages=P").
	UntouchedMiB int
	// StoppedChild forks a child that stops itself with SIGSTOP and logs
	// "FAIL stopped SIGCONT" (unhealthy) if it is ever continued.
	StoppedChild bool
	// CPUCgroup starts the workload in a cgroup v1 cpu group the test
	// creates (Workload.CPUCgroup), so that a migration that moves it
	// between cpu groups (auto-converge) only touches groups of its own.
	CPUCgroup bool
	// HostPIDNS runs the workload in the test's PID namespace instead of
	// a new one. Only a destination with a PID namespace of its own can
	// then restore it on this kernel (the frozen source holds its pids).
	HostPIDNS bool
}

// stepPeriod is the workload's step interval.
const stepPeriod = 50 * time.Millisecond

// startTimeout bounds a workload's first verification (filling 1 GiB of
// fresh memory takes seconds here).
const startTimeout = time.Minute

// Workload is a running test/workload process and every copy of it a
// migration makes. All copies share Log, which identifies them. Its methods
// read the log and /proc; they are safe to call from several goroutines
// except those taking a testing.TB.
type Workload struct {
	Dir string // per-workload directory: log, output, lock and ghost files
	Log string // the --log file
	Out string // the original process's stdout and stderr
	// CPUCgroup is the workload's cpu cgroup with WorkloadOpts.CPUCgroup,
	// relative to the hierarchy's root; cpuDir is where it is.
	CPUCgroup string
	cpuDir    string
	FlockPath string // the file locked with WorkloadOpts.Flock
	pid       int
	cmd       *exec.Cmd
	done      chan struct{} // closed once cmd.Wait returned
}

// ErrNoSteps is returned by LastStep before the first step line.
var ErrNoSteps = errors.New("workload logged no step yet")

// StartWorkload starts the workload inside ns (nil: the test's own network
// namespace) as the init of a new PID namespace and the leader of a new
// session, with stdin /dev/null and output in Out, and returns once it logged
// its first full verification. Cleanup SIGKILLs every copy (Running) and reaps
// the original.
func StartWorkload(tb testing.TB, ns *Netns, opts WorkloadOpts) *Workload {
	tb.Helper()
	RequireRoot(tb)
	bin := BuildWorkload(tb)
	dir := tb.TempDir()
	w := &Workload{
		Dir:       dir,
		Log:       filepath.Join(dir, "workload.log"),
		Out:       filepath.Join(dir, "workload.out"),
		FlockPath: filepath.Join(dir, "workload.lock"),
		done:      make(chan struct{}),
	}
	if opts.FlockDir != "" {
		w.FlockPath = filepath.Join(opts.FlockDir, "workload.lock")
	}
	argv := append([]string{bin}, w.args(opts)...)
	path := bin
	if ns != nil {
		path = RequireCommand(tb, "nsenter")
		argv = append([]string{"nsenter", "--net=" + ns.Path(), "--"}, argv...)
	}
	out, err := os.Create(w.Out)
	if err != nil {
		tb.Fatalf("workload output: %v", err)
	}
	if opts.InSession {
		path = RequireCommand(tb, "sh")
		argv = append([]string{"sh", "-c", `"$@" & wait`, "sh"}, argv...)
	}
	// No pipes: the process must outlive this side of a migration.
	w.cmd = &exec.Cmd{
		Path: path, Args: argv, Stdout: out, Stderr: out,
		SysProcAttr: &syscall.SysProcAttr{Cloneflags: pidnsFlag(opts), Setsid: true},
	}
	err = w.cmd.Start()
	out.Close() // the child has its own copy
	if err != nil {
		tb.Fatalf("start workload: %v", err)
	}
	w.pid = w.cmd.Process.Pid
	go func() { // owned by w; cleanup waits for it
		w.cmd.Wait()
		close(w.done)
	}()
	tb.Cleanup(func() { w.cleanup(tb) })
	if opts.InSession {
		w.pid = w.job(tb)
	}
	if opts.CPUCgroup {
		w.joinCPUCgroup(tb)
	}

	ok, err := poll(startTimeout, func() (bool, error) {
		select {
		case <-w.done:
			return false, fmt.Errorf("exited: %v", w.cmd.ProcessState)
		default:
		}
		return w.verifiedOnce()
	})
	if err != nil || !ok {
		tb.Fatalf("workload %d: no verified step after %v: %v\n%s", w.pid, startTimeout, err, w.tail())
	}
	for i := 1; i <= opts.Children; i++ {
		c := w.Child(i)
		ok, err := poll(startTimeout, c.verifiedOnce)
		if err != nil || !ok {
			tb.Fatalf("workload %d child %d: no verified step after %v: %v\n%s", w.pid, i, startTimeout, err, c.tail())
		}
	}
	if ns != nil {
		if in, err := ns.Contains(w.pid); err != nil || !in {
			tb.Fatalf("workload %d not in netns %s: %v", w.pid, ns.Name, err)
		}
	}
	return w
}

// verifiedOnce reports whether w's log shows a full verification; an
// unhealthy log is an error.
func (w *Workload) verifiedOnce() (bool, error) {
	st, err := w.state()
	if err == nil {
		err = st.health()
	}
	return len(st.steps) > 0 && st.steps[len(st.steps)-1].Verified > 0, err
}

// joinCPUCgroup moves the workload into a cpu cgroup of the test's own;
// cleanup removes it once every copy is gone.
func (w *Workload) joinCPUCgroup(tb testing.TB) {
	tb.Helper()
	root, err := linux.CPUV1Root()
	if err != nil {
		tb.Skipf("SKIP: no cgroup v1 cpu hierarchy: %v", err)
	}
	w.CPUCgroup = fmt.Sprintf("/phaul-test-%d-%d", os.Getpid(), w.pid)
	w.cpuDir = filepath.Join(root, w.CPUCgroup)
	if err := os.Mkdir(w.cpuDir, 0o755); err != nil {
		tb.Fatalf("workload cpu cgroup: %v", err)
	}
	if err := os.WriteFile(filepath.Join(w.cpuDir, "cgroup.procs"), []byte(strconv.Itoa(w.pid)), 0); err != nil {
		tb.Fatalf("workload cpu cgroup: %v", err)
	}
}

// job returns the pid of the stand-in shell's one job.
func (w *Workload) job(tb testing.TB) int {
	tb.Helper()
	var pids []int
	ok, err := poll(startTimeout, func() (bool, error) {
		var err error
		pids, err = running(w.Log)
		return len(pids) == 1, err
	})
	if err != nil || !ok {
		tb.Fatalf("stand-in shell %d: job not found: %v (%v)", w.cmd.Process.Pid, err, pids)
	}
	return pids[0]
}

func (w *Workload) args(o WorkloadOpts) []string {
	def := func(v, d int) int {
		if v == 0 {
			return d
		}
		return v
	}
	verify := o.Verify.Milliseconds()
	if o.Verify == 0 {
		verify = 250
	}
	a := []string{
		"--log", w.Log,
		"--mib", strconv.Itoa(def(o.MiB, 64)),
		"--threads", strconv.Itoa(def(o.Threads, 2)),
		"--rate", strconv.Itoa(max(def(o.PagesPerSec, 1000), 0)),
		"--verify-ms", strconv.FormatInt(verify, 10),
	}
	if o.TCPPair {
		a = append(a, "--tcp-pair")
	}
	if o.Flock {
		a = append(a, "--flock", w.FlockPath)
	}
	if o.Ghost || o.GhostLink {
		a = append(a, "--ghost", filepath.Join(w.Dir, "workload.ghost"),
			"--ghost-kib", strconv.Itoa(def(o.GhostKiB, 64)))
	}
	if o.GhostLink {
		a = append(a, "--ghost-link")
	}
	if o.ExtUnix != "" {
		a = append(a, "--ext-unix", o.ExtUnix)
	}
	if o.Shm {
		a = append(a, "--shm")
	}
	if o.Fill != "" {
		a = append(a, "--fill", o.Fill)
	}
	if o.Children > 0 {
		a = append(a, "--children", strconv.Itoa(o.Children))
	}
	if o.Zombie {
		a = append(a, "--zombie")
	}
	if o.StoppedChild {
		a = append(a, "--stopped-child")
	}
	if o.Memfd {
		a = append(a, "--memfd")
	}
	if o.UntouchedMiB > 0 {
		a = append(a, "--untouched-mib", strconv.Itoa(o.UntouchedMiB))
	}
	return a
}

// PID returns the host PID of the process StartWorkload started. After a
// migration the running copy has another PID: see Running.
func (w *Workload) PID() int { return w.pid }

// Running returns the host PIDs of the live copies of w (see Running).
func (w *Workload) Running(tb testing.TB) []int {
	tb.Helper()
	return Running(tb, w.Log)
}

// Running returns the host PIDs of live workload processes whose --log
// argument is logPath and whose parent is not one (the roots of their
// trees: one per copy), found through /proc/*/cmdline (zombies have none).
func Running(tb testing.TB, logPath string) []int {
	tb.Helper()
	pids, err := running(logPath)
	if err != nil {
		tb.Fatalf("find workloads: %v", err)
	}
	return pids
}

// Children returns the host PIDs of the live workload processes whose
// parent is root (WorkloadOpts.Children of the copy rooted at root).
func (w *Workload) Children(tb testing.TB, root int) []int {
	tb.Helper()
	all, err := matching(w.Log)
	if err != nil {
		tb.Fatalf("find workloads: %v", err)
	}
	var kids []int
	for _, pid := range all {
		if st, err := linux.ReadProcessStat(pid); err == nil && st.PPID == root {
			kids = append(kids, pid)
		}
	}
	return kids
}

// Child returns a view of child i (1-based) of WorkloadOpts.Children: its
// own log, read by the log methods (LastStep, Health, WaitProgress, ...).
// Process methods (PID, Running, Kill) belong to the root's Workload.
func (w *Workload) Child(i int) *Workload {
	return &Workload{Dir: w.Dir, Log: fmt.Sprintf("%s.child%d", w.Log, i), Out: w.Out,
		FlockPath: w.FlockPath, pid: w.pid, cmd: w.cmd, done: w.done}
}

func running(logPath string) ([]int, error) {
	all, err := matching(logPath)
	if err != nil {
		return nil, err
	}
	var roots []int
	for _, pid := range all {
		st, err := linux.ReadProcessStat(pid)
		if err != nil {
			continue // gone
		}
		if !slices.Contains(all, st.PPID) {
			roots = append(roots, pid)
		}
	}
	return roots, nil
}

// matching returns every live workload process with --log logPath: the
// roots and their children.
func matching(logPath string) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || len(b) == 0 {
			continue // gone, or a zombie or kernel thread
		}
		args := strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != "workload" {
			continue // also skips nsenter before it execs
		}
		for i := 1; i+1 < len(args); i++ {
			if args[i] == "--log" && args[i+1] == logPath {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids, nil
}

// Stop sends SIGTERM to every copy and waits until none runs; each copy logs
// "exit signal=TERM" and exits 0.
func (w *Workload) Stop(tb testing.TB) {
	tb.Helper()
	w.signalAll(tb, syscall.SIGTERM)
}

// Kill sends SIGKILL to every copy and waits until none runs.
func (w *Workload) Kill(tb testing.TB) {
	tb.Helper()
	w.signalAll(tb, syscall.SIGKILL)
}

func (w *Workload) signalAll(tb testing.TB, sig syscall.Signal) {
	tb.Helper()
	WaitFor(tb, 10*time.Second, func() (bool, error) {
		pids, err := matching(w.Log)
		for _, pid := range pids {
			// ESRCH: it just exited; a repeat of sig is harmless.
			if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
				return false, fmt.Errorf("kill %d: %w", pid, err)
			}
		}
		return len(pids) == 0, err
	})
}

// WaitExit waits up to timeout for the process StartWorkload started (not a
// restored copy) to exit and returns its exit status, -1 if a signal killed
// it.
func (w *Workload) WaitExit(tb testing.TB, timeout time.Duration) int {
	tb.Helper()
	select {
	case <-w.done:
		return w.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		tb.Fatalf("workload %d still running after %v", w.pid, timeout)
		return 0
	}
}

// tail returns the end of the log and the output, for failure messages.
func (w *Workload) tail() string {
	var b strings.Builder
	for _, f := range []struct{ name, path string }{{"log", w.Log}, {"output", w.Out}} {
		data, _ := os.ReadFile(f.path)
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		fmt.Fprintf(&b, "--- workload %s %s (last lines):\n%s\n", f.name, f.path,
			strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	return b.String()
}

// cleanup kills every copy and reaps the original.
func (w *Workload) cleanup(tb testing.TB) {
	tb.Helper()
	ok, err := poll(10*time.Second, func() (bool, error) {
		pids, err := matching(w.Log)
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL) // ESRCH: already gone
		}
		return len(pids) == 0, err
	})
	if err != nil || !ok {
		tb.Errorf("kill workload copies of %s: %v", w.Log, err)
	}
	// Also one that never reached exec; os.Process holds a pidfd, so this
	// cannot hit a reused PID.
	w.cmd.Process.Kill()
	select {
	case <-w.done:
	case <-time.After(10 * time.Second):
		tb.Errorf("workload %d not reaped", w.pid)
	}
	if w.cpuDir != "" {
		// Emptied by the kills above; exits are asynchronous.
		if _, err := poll(10*time.Second, func() (bool, error) { return os.Remove(w.cpuDir) == nil, nil }); err != nil || exists(w.cpuDir) {
			tb.Errorf("remove workload cpu cgroup %s: %v", w.cpuDir, err)
		}
	}
	if tb.Failed() {
		tb.Logf("%s", w.tail())
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func pidnsFlag(o WorkloadOpts) uintptr {
	if o.HostPIDNS {
		return 0
	}
	return syscall.CLONE_NEWPID
}

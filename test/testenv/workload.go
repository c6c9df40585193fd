package testenv

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// WorkloadOpts configures StartWorkload. Zero fields take the defaults shown.
type WorkloadOpts struct {
	MiB         int           // verified anonymous memory; 0: 64
	Threads     int           // dirtying threads; 0: 2
	PagesPerSec int           // pages dirtied per second by all threads; 0: 1000, <0: none
	Verify      time.Duration // period of full verification (ms resolution); 0: 250ms
	TCPPair     bool          // an established 127.0.0.1 TCP pair; CRIU needs --tcp-established
	Flock       bool          // holds flock on Workload.FlockPath; CRIU needs --file-locks
	Ghost       bool          // an open, unlinked file: a ghost file in CRIU's images
	GhostKiB    int           // its size; 0: 64. Over 1024 CRIU needs --ghost-limit
	ExtUnix     string        // path of a bound unixgram socket outside the tree (UnixSink); CRIU needs --ext-unix-sk
	Shm         bool          // the memory is MAP_SHARED anonymous instead of private
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
	Dir       string // per-workload directory: log, output, lock and ghost files
	Log       string // the --log file
	Out       string // the original process's stdout and stderr
	FlockPath string // the file locked with WorkloadOpts.Flock
	pid       int
	cmd       *exec.Cmd
	done      chan struct{} // closed once cmd.Wait returned
}

// ErrNoSteps is returned by LastStep before the first step line.
var ErrNoSteps = errors.New("workload logged no step yet")

var buildOnce = sync.OnceValues(buildWorkload)

// BuildWorkload compiles test/workload/workload.c with cc, once per test
// binary, and returns the binary's path. The binary lives in a directory of
// the temp dir named by the source's hash, kept for later runs (and for
// restores, which reopen the executable by path).
func BuildWorkload(tb testing.TB) string {
	tb.Helper()
	RequireCommand(tb, "cc")
	path, err := buildOnce()
	if err != nil {
		tb.Fatalf("build workload: %v", err)
	}
	return path
}

func buildWorkload() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	src := filepath.Join(root, "test", "workload", "workload.c")
	code, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(code)
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("phaul-workload-%x", sum[:8]))
	bin := filepath.Join(dir, "workload") // Running matches this base name
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// Build beside it and rename, so concurrent test binaries never run a
	// half-written file.
	tmp := fmt.Sprintf("%s.%d.tmp", bin, os.Getpid())
	out, err := exec.Command("cc", "-O2", "-pthread", "-Wall", "-Wextra", "-o", tmp, src).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("cc %s: %w\n%s", src, err, out)
	}
	return bin, os.Rename(tmp, bin)
}

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
	// No pipes: the process must outlive this side of a migration.
	w.cmd = &exec.Cmd{
		Path: path, Args: argv, Stdout: out, Stderr: out,
		SysProcAttr: &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Setsid: true},
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

	ok, err := poll(startTimeout, func() (bool, error) {
		select {
		case <-w.done:
			return false, fmt.Errorf("exited: %v", w.cmd.ProcessState)
		default:
		}
		st, err := w.state()
		if err == nil {
			err = st.health()
		}
		return len(st.steps) > 0 && st.steps[len(st.steps)-1].Verified > 0, err
	})
	if err != nil || !ok {
		tb.Fatalf("workload %d: no verified step after %v: %v\n%s", w.pid, startTimeout, err, w.tail())
	}
	if ns != nil {
		if in, err := ns.Contains(w.pid); err != nil || !in {
			tb.Fatalf("workload %d not in netns %s: %v", w.pid, ns.Name, err)
		}
	}
	return w
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
	if o.Ghost {
		a = append(a, "--ghost", filepath.Join(w.Dir, "workload.ghost"),
			"--ghost-kib", strconv.Itoa(def(o.GhostKiB, 64)))
	}
	if o.ExtUnix != "" {
		a = append(a, "--ext-unix", o.ExtUnix)
	}
	if o.Shm {
		a = append(a, "--shm")
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
// argument is logPath, found through /proc/*/cmdline (zombies have none).
func Running(tb testing.TB, logPath string) []int {
	tb.Helper()
	pids, err := running(logPath)
	if err != nil {
		tb.Fatalf("find workloads: %v", err)
	}
	return pids
}

func running(logPath string) ([]int, error) {
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

func (w *Workload) state() (logState, error) {
	data, err := os.ReadFile(w.Log)
	if errors.Is(err, os.ErrNotExist) {
		return logState{}, nil // not started yet
	}
	if err != nil {
		return logState{}, err
	}
	return parseLog(data)
}

// Steps returns every step line logged so far, by all copies, in log order.
func (w *Workload) Steps() ([]Step, error) {
	st, err := w.state()
	return st.steps, err
}

// LastStep returns the last step logged, or ErrNoSteps.
func (w *Workload) LastStep() (Step, error) {
	st, err := w.state()
	if err != nil {
		return Step{}, err
	}
	if len(st.steps) == 0 {
		return Step{}, ErrNoSteps
	}
	return st.steps[len(st.steps)-1], nil
}

// Lines returns the complete lines of the log that start with prefix, such
// as "ok tcp" or "CORRUPT".
func (w *Workload) Lines(prefix string) ([]string, error) {
	st, err := w.state()
	var out []string
	for _, l := range st.lines {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out, err
}

// Health returns nil if the log so far is healthy, else an error wrapping
// ErrUnhealthy: a CORRUPT or FAIL line, a step that is not one more than the
// one before (went back, repeated or skipped), or a verification count that
// went back. A malformed log is an error too.
func (w *Workload) Health() error {
	st, err := w.state()
	if err != nil {
		return err
	}
	return st.health()
}

// CheckHealthy fails the test unless Health is nil.
func (w *Workload) CheckHealthy(tb testing.TB) {
	tb.Helper()
	if err := w.Health(); err != nil {
		tb.Fatalf("workload %s: %v\n%s", w.Log, err, w.tail())
	}
}

// WaitProgress waits until n more steps than the last one logged now are
// logged. It fails the test at once if the log turns unhealthy.
func (w *Workload) WaitProgress(tb testing.TB, n int) {
	tb.Helper()
	from, err := w.LastStep()
	if err != nil && !errors.Is(err, ErrNoSteps) {
		tb.Fatalf("workload log: %v", err)
	}
	timeout := 30*time.Second + 4*time.Duration(n)*stepPeriod
	last := from.N
	ok, err := poll(timeout, func() (bool, error) {
		st, err := w.state()
		if err == nil {
			err = st.health()
		}
		if len(st.steps) > 0 {
			last = st.steps[len(st.steps)-1].N
		}
		return last >= from.N+uint64(n), err
	})
	if err != nil || !ok {
		tb.Fatalf("workload: %d steps from %d wanted, at %d after %v (running: %v): %v\n%s",
			n, from.N, last, timeout, Running(tb, w.Log), err, w.tail())
	}
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
		pids, err := running(w.Log)
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

// CorruptPage flips bits in one word of page, through /proc/PID/mem of the
// one running copy, without telling its ledger: the next verification must
// log CORRUPT and exit 3. A writer that rewrites the page first hides it, so
// use PagesPerSec < 0 for a certain result.
func (w *Workload) CorruptPage(page int) (err error) {
	st, err := w.state()
	if err != nil {
		return err
	}
	addr, pages, err := st.region()
	if err != nil {
		return err
	}
	if page < 0 || page >= pages {
		return fmt.Errorf("corrupt page %d: workload has %d", page, pages)
	}
	pids, err := running(w.Log)
	if err != nil {
		return err
	}
	if len(pids) != 1 {
		return fmt.Errorf("corrupt page: %d copies run: %v", len(pids), pids)
	}
	f, err := os.OpenFile(fmt.Sprintf("/proc/%d/mem", pids[0]), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	off := int64(addr) + int64(page)*4096 + 512 // word 64: pattern, not header
	var word [8]byte
	if _, err := f.ReadAt(word[:], off); err != nil {
		return fmt.Errorf("read page %d: %w", page, err)
	}
	word[0] ^= 0xff
	if _, err := f.WriteAt(word[:], off); err != nil {
		return fmt.Errorf("write page %d: %w", page, err)
	}
	return nil
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
		pids, err := running(w.Log)
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL) // ESRCH: already gone
		}
		return len(pids) == 0, err
	})
	if err != nil || !ok {
		tb.Errorf("kill workload copies of %s: %v", w.Log, err)
	}
	select {
	case <-w.done:
	case <-time.After(10 * time.Second):
		tb.Errorf("workload %d not reaped", w.pid)
	}
	if tb.Failed() {
		tb.Logf("%s", w.tail())
	}
}

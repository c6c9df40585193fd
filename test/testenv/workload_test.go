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

func TestWorkload(t *testing.T) {
	h := NewHosts(t, HostsOpts{})
	tests := []struct {
		name    string
		opts    WorkloadOpts
		extUnix bool     // with a sink of its own in src
		modes   []string // each logs "ok <mode>" at setup and at every check
	}{
		{name: "memory", opts: WorkloadOpts{MiB: 16, PagesPerSec: 20000, Verify: 20 * time.Millisecond}},
		{name: "static", opts: WorkloadOpts{MiB: 4, PagesPerSec: -1}},
		{name: "shm", opts: WorkloadOpts{MiB: 8, Shm: true, PagesPerSec: 20000}},
		{name: "tcp", opts: WorkloadOpts{MiB: 4, TCPPair: true}, modes: []string{"tcp"}},
		{name: "flock", opts: WorkloadOpts{MiB: 4, Flock: true}, modes: []string{"flock"}},
		{name: "ghost", opts: WorkloadOpts{MiB: 4, Ghost: true, GhostKiB: 2048}, modes: []string{"ghost"}},
		{name: "ghost-link", opts: WorkloadOpts{MiB: 4, GhostLink: true}, modes: []string{"ghost"}},
		{name: "ext-unix", opts: WorkloadOpts{MiB: 4}, extUnix: true, modes: []string{"ext-unix"}},
		{name: "all", opts: WorkloadOpts{MiB: 32, Threads: 4, PagesPerSec: 50000, TCPPair: true,
			Flock: true, Ghost: true}, extUnix: true, modes: []string{"tcp", "flock", "ghost", "ext-unix"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fds := openFDs(t)
			t.Cleanup(func() { // runs after the harness's cleanups
				if got := openFDs(t); got != fds {
					t.Errorf("test binary has %d fds, had %d", got, fds)
				}
			})
			var sink *UnixSink
			if tt.extUnix {
				sink = StartUnixSink(t, h.Src)
				tt.opts.ExtUnix = sink.Path
			}
			w := StartWorkload(t, h.Src, tt.opts)
			w.WaitProgress(t, 25)
			w.CheckHealthy(t)
			checkProcess(t, w, h.Src)
			for _, mode := range tt.modes {
				if ok, err := w.Lines("ok " + mode); err != nil || len(ok) < 3 {
					t.Errorf("%q lines: %q, %v; want setup and checks", "ok "+mode, ok, err)
				}
			}
			if tt.opts.Flock {
				checkLocked(t, w.FlockPath)
			}
			if sink != nil {
				sink.WaitTicks(t, 5)
			}
			steps, err := w.Steps()
			if err != nil || len(steps) < 25 || steps[len(steps)-1].Verified < 2 || steps[0].PID != 1 {
				t.Errorf("steps: %d, %v; want >= 25, pid 1, verified growing: %+v", len(steps), err, steps[len(steps)-1])
			}

			w.Stop(t)
			if code := w.WaitExit(t, 10*time.Second); code != 0 {
				t.Errorf("exit status %d after SIGTERM, want 0", code)
			}
			if exits, _ := w.Lines("exit signal=TERM"); len(exits) != 1 {
				t.Errorf("exit lines %q, want one", exits)
			}
			w.CheckHealthy(t)
			if pids := w.Running(t); len(pids) != 0 {
				t.Errorf("still running: %v", pids)
			}
		})
	}
}

// checkProcess checks that w runs once, in ns, as the init of its own PID
// namespace and the leader of its own session.
func checkProcess(t *testing.T, w *Workload, ns *Netns) {
	t.Helper()
	if pids := w.Running(t); !slices.Equal(pids, []int{w.PID()}) {
		t.Fatalf("Running = %v, want [%d]", pids, w.PID())
	}
	if in, err := ns.Contains(w.PID()); err != nil || !in {
		t.Errorf("not in %s: %v", ns.Name, err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.PID()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "NSpid:" && f[2] != "1" {
			t.Errorf("%s: want pid 1 in a new PID namespace", line)
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", w.PID()))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after "(comm)": state ppid pgrp session.
	f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	if sid, _ := strconv.Atoi(f[3]); sid != w.PID() {
		t.Errorf("session %d, want %d (its own)", sid, w.PID())
	}
}

// checkLocked checks from outside that the workload holds its flock.
func checkLocked(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if !errors.Is(err, syscall.EWOULDBLOCK) {
		t.Errorf("flock %s from outside: %v, want EWOULDBLOCK", path, err)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestWorkloadDetectsCorruption is the negative control of the memory check:
// a page changed behind the workload's back must be reported.
func TestWorkloadDetectsCorruption(t *testing.T) {
	w := StartWorkload(t, nil, WorkloadOpts{MiB: 4, PagesPerSec: -1, Verify: 10 * time.Millisecond})
	if err := w.CorruptPage(700); err != nil {
		t.Fatal(err)
	}
	if code := w.WaitExit(t, 10*time.Second); code != 3 {
		t.Errorf("exit status %d, want 3", code)
	}
	if lines, _ := w.Lines("CORRUPT"); len(lines) != 1 || !strings.HasPrefix(lines[0], "CORRUPT page=700 want=1 got=1 word=64") {
		t.Errorf("CORRUPT lines %q, want one for page 700 word 64", lines)
	}
	if err := w.Health(); !errors.Is(err, ErrUnhealthy) {
		t.Errorf("Health() = %v, want ErrUnhealthy", err)
	}
	if err := w.CorruptPage(1 << 20); err == nil {
		t.Error("CorruptPage of a page past the region: no error")
	}
}

// TestWorkloadDetectsModeFailure is the negative control of the mode checks.
func TestWorkloadDetectsModeFailure(t *testing.T) {
	tests := []struct {
		name    string
		opts    func(sink *UnixSink) WorkloadOpts
		breakIt func(t *testing.T, w *Workload, sink *UnixSink)
		fail    string
	}{
		{
			name: "ghost changed",
			opts: func(*UnixSink) WorkloadOpts { return WorkloadOpts{MiB: 1, Ghost: true} },
			breakIt: func(t *testing.T, w *Workload, _ *UnixSink) {
				f, err := os.OpenFile(ghostFD(t, w), os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if _, err := f.WriteAt([]byte("x"), 100); err != nil {
					t.Fatal(err)
				}
			},
			fail: "FAIL ghost content changed",
		},
		{
			name: "ext-unix peer gone",
			opts: func(sink *UnixSink) WorkloadOpts { return WorkloadOpts{MiB: 1, ExtUnix: sink.Path} },
			breakIt: func(t *testing.T, _ *Workload, sink *UnixSink) {
				sink.Stop()
			},
			fail: "FAIL ext-unix send",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sink := StartUnixSink(t, nil)
			w := StartWorkload(t, nil, tt.opts(sink))
			tt.breakIt(t, w, sink)
			if code := w.WaitExit(t, 10*time.Second); code != 4 {
				t.Errorf("exit status %d, want 4", code)
			}
			if lines, _ := w.Lines("FAIL"); len(lines) != 1 || !strings.HasPrefix(lines[0], tt.fail) {
				t.Errorf("FAIL lines %q, want %q", lines, tt.fail)
			}
			if err := w.Health(); !errors.Is(err, ErrUnhealthy) {
				t.Errorf("Health() = %v, want ErrUnhealthy", err)
			}
		})
	}
}

// ghostFD returns /proc/PID/fd/N of the workload's unlinked ghost file.
func ghostFD(t *testing.T, w *Workload) string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", w.PID())
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		if target == filepath.Join(w.Dir, "workload.ghost")+" (deleted)" {
			return filepath.Join(dir, e.Name())
		}
	}
	t.Fatalf("no ghost fd in %s", dir)
	return ""
}

// TestWorkloadSecondCopy is the negative control of what migration tests
// assert: a second copy writing the same log is counted, and its steps make
// the log unhealthy.
func TestWorkloadSecondCopy(t *testing.T) {
	w := StartWorkload(t, nil, WorkloadOpts{MiB: 1})
	w.WaitProgress(t, 5)
	dup := exec.Command(BuildWorkload(t), "--log", w.Log, "--mib", "1")
	if err := dup.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dup.Process.Kill()
		dup.Wait()
	})
	WaitFor(t, 10*time.Second, func() (bool, error) {
		pids, err := running(w.Log)
		return slices.Contains(pids, w.PID()) && slices.Contains(pids, dup.Process.Pid), err
	})
	WaitFor(t, 10*time.Second, func() (bool, error) {
		return errors.Is(w.Health(), ErrUnhealthy), nil
	})
	w.Kill(t)
	if code := w.WaitExit(t, 10*time.Second); code != -1 {
		t.Errorf("exit status %d after SIGKILL, want -1", code)
	}
	if err := dup.Wait(); err == nil {
		t.Error("second copy exited 0 after Kill")
	}
}

// TestWorkloadTicker checks the ticker's measurement: a process stopped for
// 200 ms logs a gap of about that, and small gaps otherwise. The machine is
// shared and noisy, so the bounds are loose.
func TestWorkloadTicker(t *testing.T) {
	const stop = 200 * time.Millisecond
	w := StartWorkload(t, nil, WorkloadOpts{MiB: 4})
	w.WaitProgress(t, 10)
	before, err := w.TickGaps()
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range before {
		if g.Gap <= tickReport || g.Gap > 100*time.Millisecond {
			t.Errorf("running: gap %v logged, want none over 100ms and none under %v", g.Gap, tickReport)
		}
	}

	mark := time.Now()
	if err := syscall.Kill(w.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, 10*time.Second, func() (bool, error) {
		st, err := linux.ReadProcessStat(w.PID())
		return err == nil && st.State == 'T', err
	})
	time.Sleep(stop) // the stall to measure, not a wait for an event
	if err := syscall.Kill(w.PID(), syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// The ticker's next wakeup ends the gap and the step after it logs it.
	w.WaitProgress(t, 3)
	got, err := w.LongestTickGap(mark)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stopped %v: longest tick gap %v (%d gaps logged before)", stop, got, len(before))
	// The gap began at most a tick before mark and ended before now.
	if got < stop*3/4 || got > time.Since(mark)+100*time.Millisecond {
		t.Errorf("stopped %v: longest tick gap %v, want at least %v and at most %v since the stop",
			stop, got, stop*3/4, time.Since(mark))
	}
	if all, err := w.LongestTickGap(time.Time{}); err != nil || all != got {
		t.Errorf("longest tick gap of the whole log %v, %v; want the stop's %v", all, err, got)
	}
	w.CheckHealthy(t)
}

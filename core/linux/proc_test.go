package linux

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestProcessExists(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skipf("SKIP: cannot run true: %v", err)
	}
	tests := []struct {
		name    string
		pid     int
		want    bool
		wantErr bool
	}{
		{"self", os.Getpid(), true, false},
		{"init", 1, true, false},
		{"reaped child", cmd.Process.Pid, false, false},
		{"zero", 0, false, true},
		{"negative", -1, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ProcessExists(tt.pid)
			if got != tt.want || (err != nil) != tt.wantErr {
				t.Errorf("ProcessExists(%d) = %v, %v", tt.pid, got, err)
			}
		})
	}
}

func TestParseProcessStat(t *testing.T) {
	// Fields 5 to 21 are zero but flags (9) 4194560, utime (14) 30 and
	// stime (15) 12, starttime (22) is 12345.
	tail := " 0 0 0 0 4194560 0 0 0 0 30 12" + strings.Repeat(" 0", 6) + " 12345 0 0"
	tests := []struct {
		name    string
		in      string
		want    ProcessStat
		wantErr bool
	}{
		{"plain", "42 (sleep) S 7" + tail, ProcessStat{"sleep", 'S', 7, 12345, 42, 4194560}, false},
		{"comm with ') ('", "42 (a) (b c) R 1" + tail, ProcessStat{"a) (b c", 'R', 1, 12345, 42, 4194560}, false},
		{"short", "42 (x) S 1 2 3", ProcessStat{}, true},
		{"no comm", "42 x S", ProcessStat{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcessStat(tt.in)
			if got != tt.want || (err != nil) != tt.wantErr {
				t.Errorf("parseProcessStat = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestParseProcCgroup(t *testing.T) {
	in := "9:name=systemd:/\n4:memory:/a/b\n2:cpu,cpuacct:/x y\n1:cpuset:/\n0::/\n"
	tests := []struct {
		ctrl, want string
		ok         bool
	}{
		{"cpu", "/x y", true},
		{"cpuacct", "/x y", true},
		{"memory", "/a/b", true},
		{"cpuset", "/", true},
		{"freezer", "", false},
		{"cp", "", false},
	}
	for _, tt := range tests {
		got, err := parseProcCgroup(in, tt.ctrl)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("parseProcCgroup(%q) = %q, %v; want %q", tt.ctrl, got, err, tt.want)
		}
	}
}

func TestReadProcessStat(t *testing.T) {
	// The state is the main thread's, which may sleep while a test runs.
	st, err := ReadProcessStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.PPID != os.Getppid() || st.StartTicks == 0 || st.State < 'A' || st.State > 'z' {
		t.Errorf("own stat %+v (ppid %d)", st, os.Getppid())
	}
	if _, err := ReadProcessStat(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stat of no process: %v, want fs.ErrNotExist", err)
	}
}

func TestThreadCPUTime(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Spin until the thread's CPU time grows by 20 ms, however long a
	// loaded machine makes that take: a clock that does not count this
	// thread's CPU never gets there. Then sleep 20 ms: a CPU clock adds
	// next to nothing, a wall clock adds the 20 ms.
	t0 := ThreadCPUTime()
	deadline := time.Now().Add(30 * time.Second)
	for ThreadCPUTime()-t0 < 20*time.Millisecond {
		if time.Now().After(deadline) {
			t.Fatalf("thread CPU time grew %v in 30 s of spinning", ThreadCPUTime()-t0)
		}
	}
	t1 := ThreadCPUTime()
	time.Sleep(20 * time.Millisecond)
	if slept := ThreadCPUTime() - t1; slept > 5*time.Millisecond {
		t.Fatalf("thread CPU time: sleeping 20 ms added %v", slept)
	}
}

func TestTracerPid(t *testing.T) {
	runtime.LockOSThread() // the tracer is the thread that started the child
	defer runtime.UnlockOSThread()
	plain := exec.Command("sleep", "30")
	traced := exec.Command("sleep", "30")
	traced.SysProcAttr = &syscall.SysProcAttr{Ptrace: true}
	for _, c := range []*exec.Cmd{plain, traced} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	}
	for _, tc := range []struct {
		pid, want int
	}{{plain.Process.Pid, 0}, {traced.Process.Pid, unix.Gettid()}} {
		if got, err := TracerPid(tc.pid); err != nil || got != tc.want {
			t.Errorf("TracerPid(%d) = %d, %v; want %d", tc.pid, got, err, tc.want)
		}
	}
	if _, err := TracerPid(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("tracer of no process: %v, want fs.ErrNotExist", err)
	}
}

func TestLockDir(t *testing.T) {
	dir := t.TempDir()
	release, err := LockDir(dir, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LockDir(dir, 50*time.Millisecond); !errors.Is(err, ErrLockTimeout) {
		t.Fatalf("a held lock within a timeout: %v, want ErrLockTimeout", err)
	}
	got := make(chan struct{})
	go func() {
		r2, err := LockDir(dir, time.Minute)
		if err == nil {
			r2()
		}
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("a second LockDir did not wait for the first")
	case <-time.After(50 * time.Millisecond):
	}
	release()
	<-got
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("LockDir created %d files", len(ents))
	}
	if _, err := LockDir(dir+"/none", time.Second); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LockDir of no directory: %v", err)
	}
	// A planted symlink is not followed.
	target := filepath.Join(dir, "target")
	os.WriteFile(target, nil, 0o600)
	link := filepath.Join(dir, "lock")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := LockFile(link, time.Second); err == nil {
		t.Error("LockFile followed a symlink")
	}
}

package linux

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestHavePidfdGetfd(t *testing.T) {
	// pidfd_getfd came in 5.6: older kernels must say no; newer ones may
	// still refuse it (seccomp, an LSM). TestPidfdGetfdChild checks that a
	// yes means it works.
	checkConclusive(t, "pidfd_getfd", HavePidfdGetfd(), olderThan(t, 5, 6))
}

// TestPidfdGetfdChild takes the write end of a pipe out of a child process.
func TestPidfdGetfdChild(t *testing.T) {
	requireFeature(t, HavePidfdGetfd)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command("sleep", "60")
	cmd.ExtraFiles = []*os.File{w} // fd 3 in the child
	if err := cmd.Start(); err != nil {
		t.Skipf("SKIP: cannot start sleep: %v", err)
	}
	w.Close()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	p, err := PidfdOpen(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.PID() != cmd.Process.Pid {
		t.Errorf("PID() = %d", p.PID())
	}
	got, err := p.Getfd(3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := got.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	got.Close()
	buf := make([]byte, 2)
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "hi" {
		t.Errorf("read %q, %v", buf, err)
	}
	if _, err := p.Getfd(1000); !errors.Is(err, unix.EBADF) {
		t.Errorf("Getfd(1000) = %v, want EBADF", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Getfd(3); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Getfd after Close = %v, want os.ErrClosed", err)
	}
}

func TestPidfdOpenGone(t *testing.T) {
	requireFeature(t, HavePidfdGetfd)
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skipf("SKIP: cannot run true: %v", err)
	}
	if _, err := PidfdOpen(cmd.Process.Pid); !errors.Is(err, unix.ESRCH) {
		t.Errorf("PidfdOpen(reaped child) = %v, want ESRCH", err)
	}
}

func TestParseDoomed(t *testing.T) {
	// The state and flags doomed reads, through parseProcessStat.
	stat := func(state string, flags int) string {
		return "42 (a) b) " + state + " 1 2 3 4 5 " + strconv.Itoa(flags) + strings.Repeat(" 0", 12) + " 7 0 0"
	}
	for _, tt := range []struct {
		in    string
		state byte
		flags uint64
		ok    bool
	}{
		{stat("S", 4194560), 'S', 4194560, true},
		{stat("R", 0x4|0x400000), 'R', 0x400004, true},
		{"42 (x) S 1", 0, 0, false},
		{"no comm", 0, 0, false},
	} {
		st, err := parseProcessStat(tt.in)
		if st.State != tt.state || st.Flags != tt.flags || (err == nil) != tt.ok {
			t.Errorf("parseProcessStat(%q) = %c %#x %v", tt.in, st.State, st.Flags, err)
		}
	}
	for _, tt := range []struct {
		in   string
		want bool
	}{
		{"Name:\tx\nSigPnd:\t0000000000000100\nShdPnd:\t0000000000000000\n", true},
		{"SigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n", true},
		{"SigPnd:\t0000000000000000\nShdPnd:\t0000000000004002\n", false},
		{"SigBlk:\t0000000000000100\n", false},
	} {
		if got := sigkillPending(tt.in); got != tt.want {
			t.Errorf("sigkillPending(%q) = %v", tt.in, got)
		}
	}
}

// TestWaitDoomed: a stopped process (as a frozen tree is) is not doomed;
// once SIGKILL is sent it is, before or as it exits.
func TestWaitDoomed(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	p, err := PidfdOpen(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := syscall.Kill(p.PID(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	if err := WaitDoomed([]*Pidfd{p}, 100*time.Millisecond); err == nil {
		t.Fatal("a stopped, live process counted as doomed")
	}
	if err := syscall.Kill(p.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := WaitDoomed([]*Pidfd{p}, 5*time.Second); err != nil {
		t.Fatalf("after SIGKILL: %v", err)
	}
}

func TestPidfdSignal(t *testing.T) {
	c := exec.Command("sleep", "30")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	p, err := PidfdOpen(c.Process.Pid)
	if err != nil {
		c.Process.Kill()
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Signal(unix.SIGKILL); err != nil {
		c.Process.Kill()
		t.Fatal(err)
	}
	err = c.Wait()
	if ws, ok := c.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child after Signal(SIGKILL): %v", err)
	}
	// The process is gone (reaped): its pidfd must not reach a new one.
	if err := p.Signal(unix.SIGKILL); !errors.Is(err, unix.ESRCH) {
		t.Errorf("Signal after the process was reaped: %v, want ESRCH", err)
	}
}

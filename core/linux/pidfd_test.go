package linux

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestHavePidfdGetfd(t *testing.T) {
	v, err := RunningKernel()
	if err != nil {
		t.Fatal(err)
	}
	checkProbe(t, "pidfd_getfd", HavePidfdGetfd(), v.AtLeast(5, 6))
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

func TestWaitExited(t *testing.T) {
	start := func(arg string) (*exec.Cmd, *Pidfd) {
		t.Helper()
		cmd := exec.Command("sleep", arg)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		p, err := PidfdOpen(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return cmd, p
	}
	_, short := start("0.1") // exits, stays a zombie: nobody waits for it
	_, long := start("30")
	if err := WaitExited([]*Pidfd{short}, 5*time.Second); err != nil {
		t.Fatalf("a process that exited: %v", err)
	}
	t0 := time.Now()
	if err := WaitExited([]*Pidfd{short, long}, 200*time.Millisecond); err == nil {
		t.Fatal("a running process counted as exited")
	}
	if d := time.Since(t0); d < 200*time.Millisecond {
		t.Fatalf("gave up after %v, before the timeout", d)
	}
	if err := syscall.Kill(long.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := WaitExited([]*Pidfd{short, long}, 5*time.Second); err != nil {
		t.Fatalf("after SIGKILL: %v", err)
	}
}

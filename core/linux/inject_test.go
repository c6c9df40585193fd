package linux

import (
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestInjectSyscall injects calls into children blocked in restartable
// calls and checks the call's result and that the child carries on as if
// nothing happened.
func TestInjectSyscall(t *testing.T) {
	t.Run("sleeping", func(t *testing.T) {
		// sleep 0.3 must still take ~0.3 s and exit 0: clock_nanosleep
		// is restarted with what remains.
		cmd := exec.Command("sleep", "0.3")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		waitInSyscall(t, cmd.Process.Pid)
		for range 3 {
			got, err := InjectSyscall(cmd.Process.Pid, SysGetpid)
			if err != nil {
				t.Fatal(err)
			}
			if got != int64(cmd.Process.Pid) {
				t.Fatalf("injected getpid = %d, want %d", got, cmd.Process.Pid)
			}
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("sleep after injections: %v", err)
		}
		if d := time.Since(t0); d < 250*time.Millisecond {
			t.Fatalf("sleep 0.3 returned after %v: the interrupted sleep was not restarted", d)
		}
	})
	t.Run("reading a pipe", func(t *testing.T) {
		// cat blocked in read(2): an injected userfaultfd and close of it,
		// then the data must still arrive whole.
		cmd := exec.Command("cat")
		in, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var out strings.Builder
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Process.Kill()
		waitInSyscall(t, cmd.Process.Pid)
		fd, err := InjectSyscall(cmd.Process.Pid, SysUserfaultfd, UffdInjectFlags)
		if err != nil {
			t.Fatal(err)
		}
		if fd < 0 {
			t.Fatalf("injected userfaultfd = %d", fd)
		}
		link, err := os.Readlink("/proc/" + itoa(cmd.Process.Pid) + "/fd/" + itoa(int(fd)))
		if err != nil || !strings.Contains(link, "userfaultfd") {
			t.Fatalf("fd %d of the child is %q (%v), want a userfaultfd", fd, link, err)
		}
		if rc, err := InjectSyscall(cmd.Process.Pid, SysClose, uint64(fd)); err != nil || rc != 0 {
			t.Fatalf("injected close = %d, %v", rc, err)
		}
		if _, err := os.Readlink("/proc/" + itoa(cmd.Process.Pid) + "/fd/" + itoa(int(fd))); err == nil {
			t.Fatalf("fd %d still open in the child after the injected close", fd)
		}
		io.WriteString(in, "phaul\n")
		in.Close()
		if err := cmd.Wait(); err != nil || out.String() != "phaul\n" {
			t.Fatalf("cat after injections: %v, printed %q", err, out.String())
		}
	})
	t.Run("bad errno comes back", func(t *testing.T) {
		cmd := exec.Command("sleep", "5")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Wait()
		defer cmd.Process.Kill()
		waitInSyscall(t, cmd.Process.Pid)
		got, err := InjectSyscall(cmd.Process.Pid, SysClose, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if got != -int64(syscall.EBADF) {
			t.Fatalf("injected close(1<<20) = %d, want -EBADF", got)
		}
		if err := cmd.Process.Signal(syscall.Signal(0)); err != nil {
			t.Fatalf("child gone after injection: %v", err)
		}
	})
}

func TestInjectThread(t *testing.T) {
	cmd := exec.Command("sleep", "5")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	waitInSyscall(t, cmd.Process.Pid)
	tid, err := InjectThread(cmd.Process.Pid)
	if err != nil || tid != cmd.Process.Pid {
		t.Fatalf("InjectThread = %d, %v; want the main thread %d", tid, err, cmd.Process.Pid)
	}
}

// waitInSyscall waits until pid sits in a system call (not "running").
func waitInSyscall(t *testing.T, pid int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		b, err := os.ReadFile("/proc/" + itoa(pid) + "/syscall")
		if err == nil && !strings.HasPrefix(string(b), "running") {
			// and past exec: the command name is the child's
			if c, _ := os.ReadFile("/proc/" + itoa(pid) + "/comm"); !strings.HasPrefix(string(c), "linux.test") {
				return
			}
		}
	}
	t.Fatalf("process %d never blocked in a system call", pid)
}

func itoa(n int) string { return strconv.Itoa(n) }

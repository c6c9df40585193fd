package linux

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Pidfd owns a process file descriptor from pidfd_open(2) until Close. It
// names the process even after its PID is reused. Safe for concurrent use;
// Close must not race other methods.
type Pidfd struct {
	f   *os.File
	pid int
}

// PidfdOpen opens a pidfd for the thread-group leader pid (Linux 5.3). The
// fd is close-on-exec. ESRCH means no such process.
func PidfdOpen(pid int) (*Pidfd, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	return &Pidfd{f: os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid)), pid: pid}, nil
}

// PID returns the process id the pidfd was opened for.
func (p *Pidfd) PID() int { return p.pid }

// Getfd returns a close-on-exec duplicate of the process's descriptor
// targetFD (pidfd_getfd(2), Linux 5.6). The caller owns the file. It needs
// PTRACE_MODE_ATTACH_REALCREDS over the process, so Yama's ptrace_scope
// applies. A non-blocking fd (a userfaultfd) joins the Go poller.
func (p *Pidfd) Getfd(targetFD int) (*os.File, error) {
	if p.f == nil {
		return nil, os.ErrClosed
	}
	rc, err := p.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var fd int
	if cerr := rc.Control(func(pidfd uintptr) {
		fd, err = unix.PidfdGetfd(int(pidfd), targetFD, 0)
	}); cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, fmt.Errorf("pidfd_getfd %d/%d: %w", p.pid, targetFD, err)
	}
	return os.NewFile(uintptr(fd), "fd:"+strconv.Itoa(p.pid)+"/"+strconv.Itoa(targetFD)), nil
}

// Close closes the pidfd; later calls return nil.
func (p *Pidfd) Close() error {
	if p.f == nil {
		return nil
	}
	f := p.f
	p.f = nil
	return f.Close()
}

// rawFD returns p's descriptor number for use as a target of Getfd.
func (p *Pidfd) rawFD() (int, error) {
	rc, err := p.f.SyscallConn()
	if err != nil {
		return -1, err
	}
	var raw int
	err = rc.Control(func(fd uintptr) { raw = int(fd) })
	return raw, err
}

// HavePidfdGetfd reports whether pidfd_open (5.3) and pidfd_getfd (5.6)
// work, by taking a copy of one of this process's own descriptors.
var HavePidfdGetfd = newProbe("pidfd_getfd", "5.6", probePidfdGetfd)

func probePidfdGetfd() error {
	p, err := PidfdOpen(os.Getpid())
	if err != nil {
		return classifyPidfdErr(err)
	}
	defer p.Close()
	raw, err := p.rawFD()
	if err != nil {
		return err
	}
	f, err := p.Getfd(raw)
	if err != nil {
		return classifyPidfdErr(err)
	}
	return f.Close()
}

func classifyPidfdErr(err error) error {
	switch {
	case errors.Is(err, unix.ENOSYS):
		return fmt.Errorf("%w: %w", ErrNotSupported, err)
	case errors.Is(err, unix.EPERM):
		// Taking our own fd needs no privilege: only a seccomp filter says no.
		return fmt.Errorf("%w: blocked for this process (seccomp?): %w", ErrNotSupported, err)
	}
	return err
}

// pfExiting is PF_EXITING in the flags of /proc/PID/stat (field 9): the
// task is in do_exit and never runs user code again.
const pfExiting = 0x4

// sigkillBit is SIGKILL in /proc/PID/status signal masks.
const sigkillBit = 1 << (unix.SIGKILL - 1)

// WaitDoomed waits until no process of pfds can run user code again, or
// timeout: each has exited, or every thread of it is exiting or has
// SIGKILL pending (neither can be undone). For a large process that is
// well before its pidfd turns readable: exit frees all its memory first
// (about 90 ms a GiB here).
func WaitDoomed(pfds []*Pidfd, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	left := slices.Clone(pfds)
	for {
		keep := left[:0]
		for _, p := range left {
			if exited(p) {
				continue
			}
			if d, err := doomed(p.pid); err != nil || !d {
				keep = append(keep, p)
				continue
			}
			// The pid was the process's when the check ran: it had not
			// exited just before, and a pid is reused only after.
		}
		left = keep
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for kill: %d of %d processes may still run after %v", len(left), len(pfds), timeout)
		}
		time.Sleep(time.Millisecond)
	}
}

// exited reports whether p's process has exited (its pidfd is readable).
func exited(p *Pidfd) bool {
	fd, err := p.rawFD()
	if err != nil {
		return false
	}
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// doomed reports whether every thread of pid is a zombie, exiting, or has
// SIGKILL pending. A process that is gone is doomed.
func doomed(pid int) (bool, error) {
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	for _, e := range ents {
		stat, err := os.ReadFile(dir + "/" + e.Name() + "/stat")
		if errors.Is(err, fs.ErrNotExist) {
			continue // reaped meanwhile
		}
		if err != nil {
			return false, err
		}
		st, err := parseProcessStat(string(stat))
		if err != nil {
			return false, err
		}
		if st.State == 'Z' || st.State == 'X' || st.Flags&pfExiting != 0 {
			continue
		}
		status, err := os.ReadFile(dir + "/" + e.Name() + "/status")
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return false, err
		}
		if !sigkillPending(string(status)) {
			return false, nil
		}
	}
	return true, nil
}

// sigkillPending reports whether a /proc/PID/status text shows SIGKILL
// pending for the thread (SigPnd) or its process (ShdPnd).
func sigkillPending(s string) bool {
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err == nil && mask&sigkillBit != 0 {
			return true
		}
	}
	return false
}

// Signal sends sig to the process the pidfd names (pidfd_send_signal(2),
// Linux 5.1): never to a process that reused its pid.
func (p *Pidfd) Signal(sig syscall.Signal) error {
	if p.f == nil {
		return os.ErrClosed
	}
	rc, err := p.f.SyscallConn()
	if err != nil {
		return err
	}
	if cerr := rc.Control(func(fd uintptr) { err = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); cerr != nil {
		return cerr
	}
	if err != nil {
		return fmt.Errorf("pidfd_send_signal %d %v: %w", p.pid, sig, err)
	}
	return nil
}

package linux

import (
	"errors"
	"fmt"
	"os"
	"strconv"
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

// WaitExited waits until every process of pfds has exited (all its
// threads: a pidfd turns readable only then), or timeout. A process that
// is a zombie has exited.
func WaitExited(pfds []*Pidfd, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	fds := make([]unix.PollFd, 0, len(pfds))
	for _, p := range pfds {
		fd, err := p.rawFD()
		if err != nil {
			return fmt.Errorf("wait for %d: %w", p.pid, err)
		}
		fds = append(fds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
	}
	for len(fds) > 0 {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("wait for exit: %d of %d processes still run after %v", len(fds), len(pfds), timeout)
		}
		n, err := unix.Poll(fds, int(min(left, time.Second).Milliseconds())+1)
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("wait for exit: poll: %w", err)
		}
		if n <= 0 {
			continue
		}
		keep := fds[:0]
		for _, f := range fds {
			if f.Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) == 0 {
				keep = append(keep, f)
			}
		}
		fds = keep
	}
	return nil
}

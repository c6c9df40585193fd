package linux

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ProcessExists reports whether a process (or zombie) with this pid exists
// in the caller's PID namespace, by kill(pid, 0). A process the caller may
// not signal exists too.
func ProcessExists(pid int) (bool, error) {
	if pid <= 0 {
		return false, fmt.Errorf("process exists %d: invalid pid", pid)
	}
	switch err := unix.Kill(pid, 0); {
	case err == nil, errors.Is(err, unix.EPERM):
		return true, nil
	case errors.Is(err, unix.ESRCH):
		return false, nil
	default:
		return false, fmt.Errorf("kill %d 0: %w", pid, err)
	}
}

// ProcessStat is the part of /proc/PID/stat phaul uses.
type ProcessStat struct {
	Comm  string // command name, at most 15 bytes
	State byte   // R, S, D, T, t, Z, ...
	PPID  int
	// StartTicks is the start time in clock ticks (USER_HZ) since boot.
	// With the pid it names a process across pid reuse.
	StartTicks uint64
	// CPUTicks is the CPU time the process (all its threads) used, user
	// and system, in clock ticks (USER_HZ).
	CPUTicks uint64
	// Flags is the kernel's task flags (PF_*).
	Flags uint64
}

// UserHZ is the clock tick of /proc/PID/stat's times: 100 on every Linux
// architecture phaul runs on (x86-64).
const UserHZ = 100

// ReadProcessStat reads /proc/PID/stat. The error wraps fs.ErrNotExist
// when the process is gone.
func ReadProcessStat(pid int) (ProcessStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ProcessStat{}, fmt.Errorf("read stat %d: %w", pid, err)
	}
	return parseProcessStat(string(b))
}

// parseProcessStat parses "pid (comm) state ppid ... starttime ...": comm
// may hold spaces and parentheses, so fields are counted after the last ')'.
func parseProcessStat(s string) (ProcessStat, error) {
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return ProcessStat{}, fmt.Errorf("parse stat %.40q: no (comm)", s)
	}
	f := strings.Fields(s[end+1:])
	// f[0] is field 3 (state); starttime is field 22.
	if len(f) < 20 || len(f[0]) != 1 {
		return ProcessStat{}, fmt.Errorf("parse stat %.40q: %d fields", s, len(f))
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return ProcessStat{}, fmt.Errorf("parse stat ppid: %w", err)
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return ProcessStat{}, fmt.Errorf("parse stat starttime: %w", err)
	}
	utime, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return ProcessStat{}, fmt.Errorf("parse stat utime: %w", err)
	}
	stime, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return ProcessStat{}, fmt.Errorf("parse stat stime: %w", err)
	}
	flags, err := strconv.ParseUint(f[6], 10, 64)
	if err != nil {
		return ProcessStat{}, fmt.Errorf("parse stat flags: %w", err)
	}
	return ProcessStat{Comm: s[open+1 : end], State: f[0][0], PPID: ppid, StartTicks: start, CPUTicks: utime + stime,
		Flags: flags}, nil
}

// ErrLockTimeout: a lock another process holds was not released in time.
var ErrLockTimeout = errors.New("lock held by another process")

// LockFile takes an exclusive flock on path (created 0600 if missing),
// waiting up to timeout for it, and returns the function that releases it.
// The lock dies with the process, so a crash never leaves it held. path
// must be a regular file of this user: a symlink (O_NOFOLLOW) or another
// user's file is refused.
func LockFile(path string, timeout time.Duration) (release func(), err error) {
	return lockPath(path, os.O_RDWR|os.O_CREATE, timeout)
}

// LockDir takes an exclusive flock on directory path (no file is
// created), waiting up to timeout for it, and returns its release.
func LockDir(path string, timeout time.Duration) (release func(), err error) {
	return lockPath(path, os.O_RDONLY|unix.O_DIRECTORY, timeout)
}

// lockPath opens path with flags and waits for an exclusive flock on it;
// closing the file releases it.
func lockPath(path string, flags int, timeout time.Duration) (release func(), err error) {
	f, err := os.OpenFile(path, flags|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if st.Uid != uint32(os.Geteuid()) {
		f.Close()
		return nil, fmt.Errorf("lock %s: owned by uid %d, not this user (%d)", path, st.Uid, os.Geteuid())
	}
	for deadline := time.Now().Add(timeout); ; {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w for %v", path, ErrLockTimeout, timeout)
		}
		time.Sleep(10 * time.Millisecond) // flock has no timed wait
	}
}

// ThreadCPUTime returns the CPU time the calling OS thread has used
// (CLOCK_THREAD_CPUTIME_ID). Callers measuring a piece of work lock the
// goroutine to its thread around it (runtime.LockOSThread); unlike wall
// time, it does not count time other processes took the CPU.
func ThreadCPUTime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0 // not on Linux >= 2.6.12; callers treat 0 as unknown
	}
	return time.Duration(ts.Nano())
}

// pipeMaxSizePath is the sysctl fs.pipe-max-size.
const pipeMaxSizePath = "/proc/sys/fs/pipe-max-size"

// PipeMaxSize returns fs.pipe-max-size: the largest pipe buffer, in bytes,
// that a process without CAP_SYS_RESOURCE may ask for (F_SETPIPE_SZ).
func PipeMaxSize() (int, error) {
	b, err := os.ReadFile(pipeMaxSizePath)
	if err != nil {
		return 0, fmt.Errorf("read fs.pipe-max-size: %w", err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("parse fs.pipe-max-size %q: not a size", b)
	}
	return n, nil
}

// TracerPid returns the pid of the process ptracing pid (0: none), from
// /proc/PID/status.
func TracerPid(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, fmt.Errorf("tracer of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "TracerPid:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return 0, fmt.Errorf("tracer of %d: %q: %w", pid, line, err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("tracer of %d: no TracerPid line", pid)
}

package linux

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Syscall numbers phaul injects (linux/amd64).
const (
	SysClose       = 3
	SysUserfaultfd = 323
	SysGetpid      = 39
)

// UffdInjectFlags are the flags phaul passes to an injected userfaultfd(2):
// O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY. Without USER_MODE_ONLY a
// non-root target gets EPERM (vm.unprivileged_userfaultfd is checked with
// the target's credentials); kernel writes into a tracked range are still
// tracked with it.
const UffdInjectFlags = unix.O_CLOEXEC | unix.O_NONBLOCK | uffdUserModeOnly

// ErrInjectUnsafe is wrapped when no thread of a process can be stopped
// for an injection without changing what the application sees.
var ErrInjectUnsafe = errors.New("no thread safe to inject into")

// Syscalls during which a PTRACE_INTERRUPT makes the kernel return EINTR
// to the application instead of restarting: epoll_wait, epoll_pwait,
// epoll_pwait2.
var noInterrupt = map[int]bool{232: true, 281: true, 441: true}

// InjectThread picks the thread of process pid to inject into: the first
// (the main thread preferred) that is not blocked in a call that an
// interruption would end with EINTR.
func InjectThread(pid int) (int, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("threads of %d: %w", pid, err)
	}
	tids := []int{pid}
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil && tid != pid {
			tids = append(tids, tid)
		}
	}
	for _, tid := range tids {
		b, err := os.ReadFile(filepath.Join(dir, strconv.Itoa(tid), "syscall"))
		if err != nil {
			continue // exited
		}
		nr, err := strconv.Atoi(strings.Fields(string(b) + " x")[0])
		if err != nil || !noInterrupt[nr] {
			return tid, nil // "running", -1 (not in a call) or a safe call
		}
	}
	return 0, fmt.Errorf("process %d: %w: every thread waits in epoll", pid, ErrInjectUnsafe)
}

// InjectSyscall makes thread tid run system call nr with args (at most 6)
// and returns the call's result (-errno on failure), leaving the thread
// exactly as it was: it seizes and interrupts only that thread, points it
// at a syscall instruction of its vDSO, single-steps it, and restores
// every register before detaching, so that the call the thread was in is
// restarted by the kernel's own logic. Nothing is written to the target's
// memory. Killing the caller between the step and the restore crashes the
// target: the window is a few tens of microseconds.
func InjectSyscall(tid int, nr uint64, args ...uint64) (int64, error) {
	if runtime.GOARCH != "amd64" {
		return 0, fmt.Errorf("syscall injection: %w on %s", ErrNotSupported, runtime.GOARCH)
	}
	if len(args) > 6 {
		return 0, fmt.Errorf("syscall injection: %d arguments", len(args))
	}
	gadget, err := vdsoSyscall(tid)
	if err != nil {
		return 0, err
	}
	// Every ptrace request must come from the thread that attached.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.PtraceSeize(tid); err != nil {
		if errors.Is(err, unix.EPERM) {
			return 0, fmt.Errorf("ptrace seize %d: %w (already traced, or ptrace not allowed)", tid, err)
		}
		return 0, fmt.Errorf("ptrace seize %d: %w", tid, err)
	}
	var pending int // a signal that stopped the thread meanwhile, re-delivered at detach
	defer func() {
		detach(tid, pending)
	}()
	if err := unix.PtraceInterrupt(tid); err != nil {
		return 0, fmt.Errorf("ptrace interrupt %d: %w", tid, err)
	}
	if err := waitEventStop(tid); err != nil {
		return 0, err
	}
	var saved unix.PtraceRegs
	if err := unix.PtraceGetRegs(tid, &saved); err != nil {
		return 0, fmt.Errorf("ptrace getregs %d: %w", tid, err)
	}
	regs := saved
	setSyscallRegs(&regs, gadget, nr, args)
	if err := unix.PtraceSetRegs(tid, &regs); err != nil {
		return 0, fmt.Errorf("ptrace setregs %d: %w", tid, err)
	}
	// From here the thread must get saved back whatever happens.
	defer func() {
		if err := unix.PtraceSetRegs(tid, &saved); err != nil {
			// Nothing more can be done: the detach resumes it at the gadget.
			fmt.Fprintf(os.Stderr, "phaul: restore registers of %d after injection: %v\n", tid, err)
		}
	}()
	for {
		if err := unix.PtraceSingleStep(tid); err != nil {
			return 0, fmt.Errorf("ptrace singlestep %d: %w", tid, err)
		}
		var ws unix.WaitStatus
		if _, err := wait4(tid, &ws); err != nil {
			return 0, err
		}
		if !ws.Stopped() {
			return 0, fmt.Errorf("thread %d ended during injection: %v", tid, ws)
		}
		if err := unix.PtraceGetRegs(tid, &regs); err != nil {
			return 0, fmt.Errorf("ptrace getregs %d: %w", tid, err)
		}
		if ws.StopSignal() == unix.SIGTRAP && regs.Rip == gadget+2 {
			return int64(regs.Rax), nil
		}
		if regs.Rip != gadget {
			return 0, fmt.Errorf("thread %d stopped at %#x by %v during injection", tid, regs.Rip, ws.StopSignal())
		}
		// Another signal stopped it before the step: keep it for later.
		if sig := ws.StopSignal(); sig != unix.SIGTRAP {
			pending = int(sig)
		}
	}
}

func setSyscallRegs(r *unix.PtraceRegs, gadget, nr uint64, args []uint64) {
	var a [6]uint64
	copy(a[:], args)
	r.Rip, r.Rax, r.Orig_rax = gadget, nr, ^uint64(0) // orig_rax -1: no syscall to restart
	r.Rdi, r.Rsi, r.Rdx, r.R10, r.R8, r.R9 = a[0], a[1], a[2], a[3], a[4], a[5]
	r.Eflags &^= 0x100 | 0x400 // TF, DF
}

// waitEventStop waits for the PTRACE_INTERRUPT stop of tid, resuming it
// past signal stops that come first (with their signal).
func waitEventStop(tid int) error {
	for {
		var ws unix.WaitStatus
		if _, err := wait4(tid, &ws); err != nil {
			return err
		}
		if !ws.Stopped() {
			return fmt.Errorf("thread %d ended before the injection: %v", tid, ws)
		}
		if int(ws)>>16 == unix.PTRACE_EVENT_STOP {
			return nil
		}
		if err := unix.PtraceCont(tid, int(ws.StopSignal())); err != nil {
			return fmt.Errorf("ptrace cont %d: %w", tid, err)
		}
	}
}

func wait4(tid int, ws *unix.WaitStatus) (int, error) {
	for {
		pid, err := unix.Wait4(tid, ws, unix.WALL, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("wait %d: %w", tid, err)
		}
		return pid, nil
	}
}

// detach ends the trace of tid, delivering sig (0: none).
func detach(tid, sig int) {
	unix.Syscall6(unix.SYS_PTRACE, unix.PTRACE_DETACH, uintptr(tid), 0, uintptr(sig), 0, 0)
}

// vdsoSyscall returns the address of a syscall instruction (0f 05) in the
// vDSO of tid's process.
func vdsoSyscall(tid int) (uint64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", tid))
	if err != nil {
		return 0, fmt.Errorf("maps of %d: %w", tid, err)
	}
	defer f.Close()
	var start, end uint64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasSuffix(line, "[vdso]") {
			if _, err := fmt.Sscanf(line, "%x-%x", &start, &end); err != nil {
				return 0, fmt.Errorf("maps of %d: %q: %w", tid, line, err)
			}
			break
		}
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("maps of %d: %w", tid, err)
	}
	if start == 0 || end <= start || end-start > 1<<20 {
		return 0, fmt.Errorf("process %d: no vDSO to inject through: %w", tid, ErrNotSupported)
	}
	code := make([]byte, end-start)
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", tid))
	if err != nil {
		return 0, fmt.Errorf("mem of %d: %w", tid, err)
	}
	defer mem.Close()
	if _, err := mem.ReadAt(code, int64(start)); err != nil {
		return 0, fmt.Errorf("read vDSO of %d: %w", tid, err)
	}
	i := bytes.Index(code, []byte{0x0f, 0x05})
	if i < 0 {
		return 0, fmt.Errorf("process %d: no syscall instruction in its vDSO: %w", tid, ErrNotSupported)
	}
	return start + uint64(i), nil
}

// StopThreads stops every thread of process pid (PTRACE_SEIZE and
// PTRACE_INTERRUPT, repeated until no new thread appears) and returns a
// function that lets them go on. The calling goroutine stays locked to its
// OS thread until then, and must be the one that calls thaw. A thread
// stopped inside epoll_wait returns EINTR to the application, as under
// CRIU's seize.
func StopThreads(pid int) (thaw func(), err error) {
	runtime.LockOSThread()
	var seized []int
	thaw = func() {
		for _, tid := range seized {
			detach(tid, 0)
		}
		runtime.UnlockOSThread()
	}
	defer func() {
		if err != nil {
			thaw()
		}
	}()
	done := make(map[int]bool)
	for round := 0; ; round++ {
		if round == 100 {
			return nil, fmt.Errorf("stop threads of %d: they keep appearing", pid)
		}
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			return nil, fmt.Errorf("threads of %d: %w", pid, err)
		}
		added := false
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			done[tid] = true
			if err := unix.PtraceSeize(tid); err != nil {
				if errors.Is(err, unix.ESRCH) {
					continue // exited
				}
				return nil, fmt.Errorf("ptrace seize %d: %w", tid, err)
			}
			seized = append(seized, tid)
			added = true
			if err := unix.PtraceInterrupt(tid); err != nil {
				return nil, fmt.Errorf("ptrace interrupt %d: %w", tid, err)
			}
			if err := waitEventStop(tid); err != nil {
				return nil, err
			}
		}
		if !added {
			return thaw, nil
		}
	}
}

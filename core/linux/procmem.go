package linux

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// ReadProcessMemory copies len(buf) bytes at addr of process pid into buf
// without stopping the process: with process_vm_readv, and where that
// cannot read (a page without read permission: PROT_NONE or write-only,
// which CRIU still dumps) through /proc/PID/mem, which reads as a debugger
// does. It returns how many bytes it copied: fewer than len(buf) when part
// of the range is not mapped.
func ReadProcessMemory(pid int, addr uint64, buf []byte) (int, error) {
	if len(buf) == 0 {
		return 0, nil
	}
	local := []unix.Iovec{{Base: &buf[0]}}
	local[0].SetLen(len(buf))
	remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}
	n, err := unix.ProcessVMReadv(pid, local, remote, 0)
	if err == nil && n == len(buf) {
		return n, nil
	}
	if err != nil && !errors.Is(err, unix.EFAULT) {
		return 0, fmt.Errorf("process_vm_readv %d %#x+%d: %w", pid, addr, len(buf), err)
	}
	n = max(n, 0)
	m, merr := readProcMem(pid, addr+uint64(n), buf[n:])
	if merr != nil && n == 0 && m == 0 {
		return 0, fmt.Errorf("read memory of %d at %#x+%d: %w", pid, addr, len(buf), merr)
	}
	return n + m, nil
}

// readProcMem reads through /proc/PID/mem; it stops at the first page
// that is not mapped.
func readProcMem(pid int, addr uint64, buf []byte) (int, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/mem")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var done int
	for done < len(buf) {
		n, err := f.ReadAt(buf[done:], int64(addr)+int64(done))
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// WriteProcessMemory writes buf at addr of process pid through
// /proc/PID/mem, as a debugger does: pages without write permission are
// written too, and pages never touched are allocated. The process should
// be stopped (a tree held by CRIU): a running one may race the write.
func WriteProcessMemory(pid int, addr uint64, buf []byte) error {
	f, err := os.OpenFile("/proc/"+strconv.Itoa(pid)+"/mem", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("write memory of %d: %w", pid, err)
	}
	defer f.Close()
	if _, err := f.WriteAt(buf, int64(addr)); err != nil {
		return fmt.Errorf("write memory of %d at %#x+%d: %w", pid, addr, len(buf), err)
	}
	return nil
}

package linux

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// ReadProcessMemory copies len(buf) bytes at addr of process pid into buf
// with process_vm_readv, without stopping the process. It returns how many
// bytes it copied: fewer than len(buf) when part of the range is not
// mapped (then err is nil when some bytes came, as the kernel reports).
func ReadProcessMemory(pid int, addr uint64, buf []byte) (int, error) {
	if len(buf) == 0 {
		return 0, nil
	}
	local := []unix.Iovec{{Base: &buf[0]}}
	local[0].SetLen(len(buf))
	remote := []unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}
	n, err := unix.ProcessVMReadv(pid, local, remote, 0)
	if err != nil {
		return 0, fmt.Errorf("process_vm_readv %d %#x+%d: %w", pid, addr, len(buf), err)
	}
	return n, nil
}

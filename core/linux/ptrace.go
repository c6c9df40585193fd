package linux

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"
)

// PtraceScope is the value of Yama's kernel.yama.ptrace_scope sysctl.
type PtraceScope int

// Yama ptrace scopes (Documentation/admin-guide/LSM/Yama.rst).
const (
	PtraceScopeNoYama     PtraceScope = -1 // Yama not built in or not enabled
	PtraceScopeClassic    PtraceScope = 0  // classic ptrace permissions
	PtraceScopeRestricted PtraceScope = 1  // only descendants, PR_SET_PTRACER, or CAP_SYS_PTRACE
	PtraceScopeAdminOnly  PtraceScope = 2  // only CAP_SYS_PTRACE
	PtraceScopeNoAttach   PtraceScope = 3  // nobody; cannot be lowered until reboot
)

const ptraceScopePath = "/proc/sys/kernel/yama/ptrace_scope"

// String describes the scope's meaning.
func (s PtraceScope) String() string {
	switch s {
	case PtraceScopeNoYama:
		return "Yama off (classic ptrace permissions)"
	case PtraceScopeClassic:
		return "0 (classic ptrace permissions)"
	case PtraceScopeRestricted:
		return "1 (restricted: descendants, PR_SET_PTRACER or CAP_SYS_PTRACE)"
	case PtraceScopeAdminOnly:
		return "2 (admin-only: CAP_SYS_PTRACE)"
	case PtraceScopeNoAttach:
		return "3 (no attach: ptrace disabled until reboot)"
	}
	return strconv.Itoa(int(s)) + " (unknown)"
}

// AllowsPrivilegedAttach reports whether a process with CAP_SYS_PTRACE (root,
// as CRIU runs) may attach to an unrelated process: every scope but 3.
// PTRACE_SEIZE, pidfd_getfd and CRIU's dump and restore all need that.
func (s PtraceScope) AllowsPrivilegedAttach() bool { return s != PtraceScopeNoAttach }

// ReadPtraceScope reads kernel.yama.ptrace_scope; without Yama it returns
// PtraceScopeNoYama and no error.
func ReadPtraceScope() (PtraceScope, error) {
	b, err := os.ReadFile(ptraceScopePath)
	if errors.Is(err, fs.ErrNotExist) {
		return PtraceScopeNoYama, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read ptrace_scope: %w", err)
	}
	return parsePtraceScope(string(b))
}

func parsePtraceScope(s string) (PtraceScope, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n < 0 {
		return 0, fmt.Errorf("parse ptrace_scope %q: not a scope", s)
	}
	return PtraceScope(n), nil
}

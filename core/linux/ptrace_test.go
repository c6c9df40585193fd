package linux

import (
	"errors"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"
)

func TestParsePtraceScope(t *testing.T) {
	tests := []struct {
		in      string
		want    PtraceScope
		wantErr bool
	}{
		{"0\n", PtraceScopeClassic, false},
		{"1\n", PtraceScopeRestricted, false},
		{"2", PtraceScopeAdminOnly, false},
		{"3\n", PtraceScopeNoAttach, false},
		{"", 0, true},
		{"-1", 0, true},
		{"x", 0, true},
	}
	for _, tt := range tests {
		got, err := parsePtraceScope(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parsePtraceScope(%q) = %v, %v", tt.in, got, err)
		}
	}
	if !PtraceScopeAdminOnly.AllowsPrivilegedAttach() || PtraceScopeNoAttach.AllowsPrivilegedAttach() {
		t.Error("AllowsPrivilegedAttach: only scope 3 forbids root")
	}
}

// TestReadPtraceScope checks the reading against what really decides it.
// A kernel built without Yama has no scope; one built with it may still not
// run it (an LSM is active only when the boot's LSM list names it), so the
// build config only rules Yama out. Where securityfs lists the active LSMs,
// that list decides; where the sysctl exists, its text is the scope.
func TestReadPtraceScope(t *testing.T) {
	s, err := ReadPtraceScope()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ptrace_scope: %v", s)
	if notBuilt(t, "CONFIG_SECURITY_YAMA") && s != PtraceScopeNoYama {
		t.Errorf("kernel built without Yama, yet scope %v", s)
	}
	if lsm, err := os.ReadFile("/sys/kernel/security/lsm"); err == nil {
		active := slices.Contains(strings.Split(strings.TrimSpace(string(lsm)), ","), "yama")
		if active != (s != PtraceScopeNoYama) {
			t.Errorf("active LSMs %q, yet scope %v", lsm, s)
		}
	}
	b, err := os.ReadFile(ptraceScopePath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if s != PtraceScopeNoYama {
			t.Errorf("no %s, yet scope %v", ptraceScopePath, s)
		}
	case err != nil:
		t.Fatal(err)
	default:
		if want, perr := parsePtraceScope(string(b)); perr != nil || want != s || s == PtraceScopeNoYama {
			t.Errorf("%s holds %q, scope %v", ptraceScopePath, b, s)
		}
	}
}

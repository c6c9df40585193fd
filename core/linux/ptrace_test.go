package linux

import "testing"

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

func TestReadPtraceScope(t *testing.T) {
	cfg := kernelConfig(t)
	s, err := ReadPtraceScope()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ptrace_scope: %v", s)
	if yama := cfg["CONFIG_SECURITY_YAMA"] == "y"; yama != (s != PtraceScopeNoYama) {
		t.Errorf("CONFIG_SECURITY_YAMA=%v but scope %v", yama, s)
	}
}

package criu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/checkpoint-restore/go-criu/v8/rpc"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestOptionsApply: every migrate flag reaches CRIU's RPC options.
func TestOptionsApply(t *testing.T) {
	o := Options{TCPEstablished: true, FileLocks: true, ExtUnixSk: true, ShellJob: true, LinkRemap: true,
		GhostLimit: 8 << 20, ManageCgroups: "soft"}
	opts := &rpc.CriuOpts{}
	o.apply(opts)
	checks := map[string]bool{
		"tcp_established": opts.GetTcpEstablished(), "file_locks": opts.GetFileLocks(),
		"ext_unix_sk": opts.GetExtUnixSk(), "shell_job": opts.GetShellJob(), "link_remap": opts.GetLinkRemap(),
		"ghost_limit":         opts.GetGhostLimit() == 8<<20,
		"manage_cgroups_mode": opts.GetManageCgroupsMode() == rpc.CriuCgMode_SOFT,
	}
	for name, ok := range checks {
		if !ok {
			t.Errorf("%s not carried: %v", name, opts)
		}
	}
	def := &rpc.CriuOpts{}
	Options{}.apply(def)
	if def.GetManageCgroupsMode() != rpc.CriuCgMode_IGNORE || def.GhostLimit != nil {
		t.Errorf("defaults: mode %v, ghost %v", def.GetManageCgroupsMode(), def.GhostLimit)
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, tt := range []struct {
		name string
		o    Options
		ok   bool
	}{
		{"zero", Options{}, true},
		{"modes", Options{ManageCgroups: "strict"}, true},
		{"bad mode", Options{ManageCgroups: "hard"}, false},
		{"ghost max", Options{GhostLimit: MaxGhostLimit}, true},
		{"ghost over", Options{GhostLimit: MaxGhostLimit + 1}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.o.Validate(); (err == nil) != tt.ok {
				t.Fatalf("Validate() = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

func TestErrorMessage(t *testing.T) {
	tests := []struct {
		name string
		e    Error
		want []string
		not  []string
	}{
		{"cause wins over noise", Error{Action: "dump", ExitCode: 1,
			Message: "Error (criu/util.c:1): rlimit: Can't setup RLIMIT_NOFILE for self\n",
			Cause:   "Error (criu/sk-inet.c:200): inet: Connected TCP socket"},
			[]string{"criu dump: exit 1", "Connected TCP socket"}, []string{"RLIMIT", "\n"}},
		{"message without cause", Error{Action: "restore", ExitCode: 1, Message: "bad things"},
			[]string{"bad things"}, nil},
		{"noise only falls back to the tail", Error{Action: "dump", ExitCode: 1,
			Message: "rlimit: Can't setup RLIMIT_NOFILE", LogTail: []string{"a", "last line"}},
			[]string{"last line"}, []string{"RLIMIT"}},
		{"our own script failure", Error{Action: "dump", ExitCode: 1,
			Err: &notifyError{script: "post-dump", err: errors.New("destination aborted")}, Cause: "Error: RPC client reported script error"},
			[]string{"post-dump script failed: destination aborted"}, []string{"RPC client"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.e.Error()
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("%q lacks %q", got, w)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(got, n) {
					t.Errorf("%q has %q", got, n)
				}
			}
		})
	}
}

func TestFirstError(t *testing.T) {
	log := filepath.Join(t.TempDir(), "dump.log")
	os.WriteFile(log, []byte(strings.Join([]string{
		"(00.000001) Version: 4.2.1",
		"(00.000100) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted",
		"(00.010000) Error (criu/files-reg.c:1031): Can't dump ghost file /x of 2097152 size, increase limit",
		"(00.020000) Error (criu/cr-dump.c:1975): Dumping FAILED.",
	}, "\n")), 0o600)
	if got := firstError(log); !strings.HasPrefix(got, "Error (criu/files-reg.c:1031)") {
		t.Fatalf("firstError = %q", got)
	}
	if got := tailFile(log, 2); len(got) != 2 || !strings.Contains(got[1], "Dumping FAILED") {
		t.Fatalf("tailFile = %q", got)
	}
	if firstError(filepath.Join(t.TempDir(), "none")) != "" || tailFile("/nonexistent", 3) != nil {
		t.Fatal("a missing log must give nothing")
	}
}

// TestLocateOrder: --criu, then $PHAUL_CRIU; an explicit path that does not
// exist is an error, not skipped.
func TestLocateOrder(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "criu-fake")
	os.WriteFile(fake, []byte("#!/bin/sh\nexit 1\n"), 0o755)
	t.Setenv("PHAUL_CRIU", fake)
	b, err := find("")
	if err != nil || b.Path != fake || b.Source != "env" {
		t.Fatalf("env: %+v, %v", b, err)
	}
	b, err = find(fake)
	if err != nil || b.Source != "flag" {
		t.Fatalf("flag: %+v, %v", b, err)
	}
	if _, err := find(filepath.Join(dir, "missing")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing flag path: %v", err)
	}
	t.Setenv("PHAUL_CRIU", filepath.Join(dir, "missing"))
	if _, err := find(""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing env path: %v", err)
	}
	// A binary that does not speak RPC: Locate fails with CRIU's exit.
	t.Setenv("PHAUL_CRIU", "")
	_, err = Locate(context.Background(), fake, nil)
	var ce *Error
	if !errors.As(err, &ce) || ce.ExitCode != 1 {
		t.Fatalf("Locate(fake) = %v, want a criu.Error with exit 1", err)
	}
}

func TestVersion(t *testing.T) {
	v := Version{Major: 4, Minor: 2, Sub: 1}
	if !v.AtLeast(4, 2) || !v.AtLeast(3, 17) || v.AtLeast(4, 3) || v.AtLeast(5, 0) {
		t.Fatalf("AtLeast wrong for %v", v)
	}
	if v.String() != "4.2.1" {
		t.Fatalf("String() = %q", v)
	}
}

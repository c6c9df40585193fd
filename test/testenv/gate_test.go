package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// recordTB records a gate's verdict; Skipf and Fatalf end the goroutine as
// the real ones do.
type recordTB struct {
	testing.TB
	skipped, failed bool
	msg             string
}

func (r *recordTB) Helper() {}

func (r *recordTB) Skipf(format string, args ...any) {
	r.skipped, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (r *recordTB) Fatalf(format string, args ...any) {
	r.failed, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// runGate runs gate in its own goroutine, so that Goexit ends only it.
func runGate(t *testing.T, gate func(testing.TB)) *recordTB {
	r := &recordTB{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		gate(r)
	}()
	<-done
	return r
}

func TestRequireFound(t *testing.T) {
	tests := []struct {
		name          string
		err           error
		ci            string
		skip, failure bool
	}{
		{name: "found", err: nil},
		{name: "no CRIU", err: errNoCRIU, skip: true},
		{name: "no CRIU on CI", err: errNoCRIU, ci: "true", failure: true},
		{name: "no command", err: fmt.Errorf("tc: %w", exec.ErrNotFound), skip: true},
		{name: "no command on CI", err: fmt.Errorf("tc: %w", exec.ErrNotFound), ci: "true", failure: true},
		{name: "broken PHAUL_CRIU", err: os.ErrPermission, failure: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("CI", tt.ci)
			r := runGate(t, func(tb testing.TB) { requireFound(tb, tt.err) })
			if r.skipped != tt.skip || r.failed != tt.failure {
				t.Errorf("skipped=%v failed=%v (%q), want skipped=%v failed=%v",
					r.skipped, r.failed, r.msg, tt.skip, tt.failure)
			}
		})
	}
}

func TestRequireKernelFeature(t *testing.T) {
	tests := []struct {
		name          string
		err           error
		skip, failure bool
	}{
		{name: "present"},
		{name: "missing", err: fmt.Errorf("PAGEMAP_SCAN (Linux 6.7+): %w", linux.ErrNotSupported), skip: true},
		{name: "probe broken", err: errors.New("probe PAGEMAP_SCAN: too many open files"), failure: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runGate(t, func(tb testing.TB) { RequireKernelFeature(tb, func() error { return tt.err }) })
			if r.skipped != tt.skip || r.failed != tt.failure {
				t.Errorf("skipped=%v failed=%v (%q), want skipped=%v failed=%v",
					r.skipped, r.failed, r.msg, tt.skip, tt.failure)
			}
		})
	}
}

func TestFindCRIU(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "criu-exe")
	plain := filepath.Join(dir, "criu-plain")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plain, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing")
	t.Setenv("PATH", t.TempDir()) // no criu on PATH
	tests := []struct {
		name                string
		explicit, installed string
		want                string
		noCRIU, otherErr    bool
	}{
		{name: "explicit wins", explicit: exe, installed: exe + "-other", want: exe},
		{name: "explicit missing", explicit: missing, installed: exe, otherErr: true},
		{name: "explicit not executable", explicit: plain, installed: exe, otherErr: true},
		{name: "installed", installed: exe, want: exe},
		{name: "installed not executable", installed: plain, noCRIU: true},
		{name: "none", installed: missing, noCRIU: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := findCRIU(tt.explicit, tt.installed)
			switch {
			case tt.noCRIU != errors.Is(err, errNoCRIU):
				t.Errorf("findCRIU() error %v, want errNoCRIU=%v", err, tt.noCRIU)
			case tt.otherErr != (err != nil && !errors.Is(err, errNoCRIU)):
				t.Errorf("findCRIU() error %v, want other error=%v", err, tt.otherErr)
			case got != tt.want:
				t.Errorf("findCRIU() = %q, want %q", got, tt.want)
			}
		})
	}
	t.Run("PATH", func(t *testing.T) {
		t.Setenv("PATH", dir)
		if err := os.Link(exe, filepath.Join(dir, "criu")); err != nil {
			t.Fatal(err)
		}
		if got, err := findCRIU("", missing); got != filepath.Join(dir, "criu") || err != nil {
			t.Errorf("findCRIU() = %q, %v; want %s/criu", got, err, dir)
		}
	})
}

func TestPoll(t *testing.T) {
	n := 0
	ok, err := poll(time.Minute, func() (bool, error) { n++; return n == 3, nil })
	if !ok || err != nil || n != 3 {
		t.Errorf("poll() = %v, %v after %d calls; want true after 3", ok, err, n)
	}
	errStop := errors.New("stop")
	if ok, err := poll(time.Minute, func() (bool, error) { return false, errStop }); ok || err != errStop {
		t.Errorf("poll() = %v, %v; want false, stop", ok, err)
	}
	if ok, err := poll(10*time.Millisecond, func() (bool, error) { return false, nil }); ok || err != nil {
		t.Errorf("poll() = %v, %v; want a timeout (false, nil)", ok, err)
	}
}

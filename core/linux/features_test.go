package linux

import (
	"bufio"
	"compress/gzip"
	"errors"
	"os"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestProbeCaching(t *testing.T) {
	errOdd := errors.New("odd")
	tests := []struct {
		name      string
		answer    error
		wantCalls int // after three calls
		wantIs    error
	}{
		{"supported is cached", nil, 1, nil},
		{"not supported is cached", ErrNotSupported, 1, ErrNotSupported},
		{"wrapped not supported is cached", errors.Join(ErrNotSupported, unix.ENOTTY), 1, unix.ENOTTY},
		{"other error is retried", errOdd, 3, errOdd},
		{"errno is retried", unix.EMFILE, 3, unix.EMFILE},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			p := newProbe("THING", "9.9", func() error { calls++; return tt.answer })
			for range 3 {
				err := p()
				if !errors.Is(err, tt.wantIs) || (tt.wantIs == nil) != (err == nil) {
					t.Fatalf("probe() = %v, want errors.Is %v", err, tt.wantIs)
				}
				if errors.Is(tt.answer, ErrNotSupported) && !strings.Contains(err.Error(), "THING (Linux 9.9+)") {
					t.Errorf("error %q lacks name and version", err)
				}
			}
			if calls != tt.wantCalls {
				t.Errorf("fn ran %d times, want %d", calls, tt.wantCalls)
			}
		})
	}
}

// kernelConfigIfAny returns the running kernel's build options from
// /proc/config.gz, and false if the kernel does not publish them. A build
// option only rules a feature out: built in, a feature may still be off
// (an LSM not in the boot's list, a sysctl, seccomp), so tests use it for
// "not built ⇒ not available" and never the other way round.
func kernelConfigIfAny(t *testing.T) (map[string]string, bool) {
	t.Helper()
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		t.Logf("no /proc/config.gz: %v", err)
		return nil, false
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("read config.gz: %v", err)
	}
	cfg := map[string]string{}
	sc := bufio.NewScanner(zr)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read config.gz: %v", err)
	}
	return cfg, true
}

// notBuilt reports whether the kernel's config is known and has option
// neither built in nor as a module.
func notBuilt(t *testing.T, option string) bool {
	t.Helper()
	cfg, ok := kernelConfigIfAny(t)
	return ok && cfg[option] != "y" && cfg[option] != "m"
}

// olderThan reports whether the running kernel is older than major.minor:
// a feature that came later cannot be there. A newer kernel proves nothing
// (the feature may be configured out, blocked by seccomp or an LSM, or
// missing on this architecture).
func olderThan(t *testing.T, major, minor int) bool {
	t.Helper()
	v, err := RunningKernel()
	if err != nil {
		t.Fatal(err)
	}
	return !v.AtLeast(major, minor)
}

// checkConclusive fails unless err is nil or wraps ErrNotSupported (a probe
// must answer, not fail), and, when ruledOut, unless it wraps ErrNotSupported.
func checkConclusive(t *testing.T, name string, err error, ruledOut bool) {
	t.Helper()
	switch {
	case err != nil && !errors.Is(err, ErrNotSupported):
		t.Errorf("%s: probe failed: %v", name, err)
	case ruledOut && err == nil:
		t.Errorf("%s: supported, but the kernel's version or build rules it out", name)
	case err != nil && err.Error() == "":
		t.Errorf("%s: unsupported without a reason", name)
	default:
		t.Logf("%s: %v", name, err)
	}
}

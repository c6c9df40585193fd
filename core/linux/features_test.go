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

// kernelConfig returns the running kernel's build options from
// /proc/config.gz, the independent oracle these tests compare probes with.
func kernelConfig(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		t.Skipf("SKIP: no /proc/config.gz to compare the probe with: %v", err)
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
	return cfg
}

// requireKernel skips loudly below major.minor.
func requireKernel(t *testing.T, major, minor int) {
	t.Helper()
	v, err := RunningKernel()
	if err != nil {
		t.Fatal(err)
	}
	if !v.AtLeast(major, minor) {
		t.Skipf("SKIP: kernel %v older than %d.%d", v, major, minor)
	}
}

// checkProbe fails unless err is nil (want true) or wraps ErrNotSupported
// (want false).
func checkProbe(t *testing.T, name string, err error, want bool) {
	t.Helper()
	switch {
	case want && err != nil:
		t.Errorf("%s: got %v, want supported", name, err)
	case !want && !errors.Is(err, ErrNotSupported):
		t.Errorf("%s: got %v, want an error wrapping ErrNotSupported", name, err)
	default:
		t.Logf("%s: %v", name, err)
	}
}

package testenv

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// InstalledCRIU is where deploy/install-criu.sh puts CRIU.
const InstalledCRIU = "/opt/phaul/criu/bin/criu"

var errNoCRIU = errors.New("CRIU not installed: run deploy/install-criu.sh")

// onCI reports whether the tests run on CI, where gates must not skip.
func onCI() bool { return os.Getenv("CI") == "true" }

// RequireRoot skips the test unless it runs as root.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skipf("SKIP: needs root (euid %d)", os.Geteuid())
	}
}

// RequireCRIU returns the path of the CRIU binary to test with: $PHAUL_CRIU if
// set (it must then be executable, else the test fails), else InstalledCRIU,
// else criu from PATH. Without one it skips the test, or fails it on CI.
func RequireCRIU(tb testing.TB) string {
	tb.Helper()
	path, err := findCRIU(os.Getenv("PHAUL_CRIU"), InstalledCRIU)
	requireFound(tb, err)
	return path
}

// RequireCommand returns the path of the program name from PATH. Without it
// it skips the test, or fails it on CI.
func RequireCommand(tb testing.TB, name string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		err = fmt.Errorf("%s not installed: %w", name, err)
	}
	requireFound(tb, err)
	return path
}

// RequireKernelFeature skips the test if probe (a core/linux probe such as
// linux.HavePagemapScan) reports a missing feature (linux.ErrNotSupported), on
// CI too: CI cannot install a kernel feature. Any other error fails the test.
func RequireKernelFeature(tb testing.TB, probe func() error) {
	tb.Helper()
	switch err := probe(); {
	case err == nil:
	case errors.Is(err, linux.ErrNotSupported):
		tb.Skipf("SKIP: kernel lacks it: %v", err)
	default:
		tb.Fatalf("feature probe failed: %v", err)
	}
}

// requireFound skips (fails on CI) on a missing program and fails on any
// other error.
func requireFound(tb testing.TB, err error) {
	tb.Helper()
	switch {
	case err == nil:
	case !errors.Is(err, errNoCRIU) && !errors.Is(err, exec.ErrNotFound):
		tb.Fatalf("%v", err)
	case onCI():
		tb.Fatalf("on CI (CI=true) a missing program fails: %v", err)
	default:
		tb.Skipf("SKIP: %v", err)
	}
}

// findCRIU looks CRIU up: explicit (from $PHAUL_CRIU) wins and must be
// executable; then installed; then PATH. A missing CRIU is errNoCRIU.
func findCRIU(explicit, installed string) (string, error) {
	if explicit != "" {
		if err := executable(explicit); err != nil {
			return "", fmt.Errorf("PHAUL_CRIU=%s: %w", explicit, err)
		}
		return explicit, nil
	}
	if executable(installed) == nil {
		return installed, nil
	}
	if path, err := exec.LookPath("criu"); err == nil {
		return filepath.Abs(path)
	}
	return "", errNoCRIU
}

func executable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s: not an executable file: %w", path, fs.ErrPermission)
	}
	return nil
}

// WaitFor polls cond until it reports true and fails the test if that takes
// longer than timeout. An error from cond fails the test at once.
func WaitFor(tb testing.TB, timeout time.Duration, cond func() (bool, error)) {
	tb.Helper()
	ok, err := poll(timeout, cond)
	if err != nil {
		tb.Fatalf("wait: %v", err)
	}
	if !ok {
		tb.Fatalf("wait: condition still false after %v", timeout)
	}
}

// poll calls cond until it returns true or an error, or timeout passes
// (false, nil). It backs off from 1 ms to 50 ms between calls.
func poll(timeout time.Duration, cond func() (bool, error)) (bool, error) {
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		ok, err := cond()
		if ok || err != nil {
			return ok, err
		}
		if time.Now().After(deadline) {
			return false, nil
		}
		time.Sleep(delay) // a poll interval against the deadline
	}
}

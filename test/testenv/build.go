package testenv

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// buildOnce caches the build for the test binary's life.
var buildOnce = sync.OnceValues(buildWorkload)

// BuildWorkload compiles test/workload/workload.c with cc, once per test
// binary, and returns the binary's path. The binary lives in a directory of
// the temp dir named by the source's hash, kept for later runs (and for
// restores, which reopen the executable by path).
func BuildWorkload(tb testing.TB) string {
	tb.Helper()
	RequireCommand(tb, "cc")
	path, err := buildOnce()
	if err != nil {
		tb.Fatalf("build workload: %v", err)
	}
	return path
}

func buildWorkload() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	src := filepath.Join(root, "test", "workload", "workload.c")
	code, err := os.ReadFile(src)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(code)
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("phaul-workload-%x", sum[:8]))
	bin := filepath.Join(dir, "workload") // Running matches this base name
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// Build beside it and rename, so concurrent test binaries never run a
	// half-written file.
	tmp := fmt.Sprintf("%s.%d.tmp", bin, os.Getpid())
	out, err := exec.Command("cc", "-O2", "-pthread", "-Wall", "-Wextra", "-o", tmp, src).CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("cc %s: %w\n%s", src, err, out)
	}
	return bin, os.Rename(tmp, bin)
}

// repoRoot finds the module root from the working directory, which go test
// sets to the package's directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "test", "hosts.sh")); err == nil {
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
				return dir, nil
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("testenv: no phaul checkout above the working directory")
		}
		dir = parent
	}
}

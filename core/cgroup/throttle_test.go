package cgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// TestThrottle: a busy child in a cpu cgroup the test owns is throttled
// to a tenth of a CPU in phaul's group, then released back to the test's
// group, and phaul's group is gone.
func TestThrottle(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root (cgroups)")
	}
	root, err := linux.CPUV1Root()
	if err != nil {
		t.Skipf("SKIP: no cgroup v1 cpu hierarchy: %v", err)
	}
	own := filepath.Join(root, fmt.Sprintf("phaul-test-%d", os.Getpid()))
	if err := os.Mkdir(own, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "while :; do :; done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.Remove(own)
	})
	if err := write(own, "cgroup.procs", int64(pid)); err != nil {
		t.Fatal(err)
	}
	usage := func() float64 {
		t0, c0 := time.Now(), TreeCPU([]int{pid})
		time.Sleep(time.Second)
		return float64(TreeCPU([]int{pid})-c0) / float64(time.Since(t0))
	}
	before := usage()
	th, err := NewThrottle(fmt.Sprintf("test-%d", os.Getpid()), []int{pid})
	if err != nil {
		t.Fatal(err)
	}
	if err := th.Set([]int{pid}, 90, 1.0); err != nil {
		th.Release()
		t.Fatal(err)
	}
	got, err := linux.ProcessCgroupV1(pid, "cpu")
	if err != nil || got != filepath.Join("/", Parent, fmt.Sprintf("test-%d", os.Getpid())) {
		th.Release()
		t.Fatalf("throttled child in cpu cgroup %q (%v)", got, err)
	}
	usage() // the throttle takes a period to bite
	during := usage()
	stat, err := os.ReadFile(filepath.Join(root, Parent, fmt.Sprintf("test-%d", os.Getpid()), "cpu.stat"))
	if err != nil {
		th.Release()
		t.Fatal(err)
	}
	if err := th.Release(); err != nil {
		t.Fatal(err)
	}
	after, err := linux.ProcessCgroupV1(pid, "cpu")
	if err != nil || filepath.Join(root, after) != own {
		t.Fatalf("released child in cpu cgroup %q (%v), want the test's %s", after, err, own)
	}
	if _, err := os.Stat(filepath.Join(root, Parent, fmt.Sprintf("test-%d", os.Getpid()))); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("phaul's throttle group left behind: %v", err)
	}
	// The quota caps the child whatever else runs; load can only lower
	// what it gets. The kernel's own count of throttled periods shows the
	// cap was what held it, not a busy machine. How much the child got
	// before depends on the load, so it only has to exceed the cap.
	t.Logf("CPU: %.2f cores before, %.2f throttled to 10%% of one; cpu.stat %q", before, during, stat)
	if during > 0.2 {
		t.Fatalf("CPU %.2f cores throttled: want a busy child held near 0.1", during)
	}
	if n := statField(string(stat), "nr_throttled"); n < 1 {
		t.Fatalf("cpu.stat %q: the child was never throttled", stat)
	}
	if before <= 0.2 {
		t.Logf("the child got %.2f cores unthrottled: this machine is loaded", before)
	}
}

// statField returns the value of key in a cgroup stat file, or -1.
func statField(stat, key string) int64 {
	for _, line := range strings.Split(stat, "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == key {
			if n, err := strconv.ParseInt(v, 10, 64); err == nil {
				return n
			}
		}
	}
	return -1
}

package cgroup

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// TestHold: a busy child is held (no CPU time while held), released back
// to the group it came from (it runs again), held again and killed; no
// group of phaul's is left. The negative control: the same child runs
// before it is held.
func TestHold(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root (cgroups)")
	}
	if _, err := linux.FreezerV1Root(); err != nil {
		if err2 := linux.HaveFreezerV2(); err2 != nil {
			t.Skipf("SKIP: no freezer: v1 %v; v2 %v", err, err2)
		}
	}
	cmd := exec.Command("sh", "-c", "while :; do :; done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	cpu := func() time.Duration {
		c0 := TreeCPU([]int{pid})
		time.Sleep(300 * time.Millisecond)
		return TreeCPU([]int{pid}) - c0
	}
	if got := cpu(); got < 50*time.Millisecond {
		t.Fatalf("negative control: the busy child used %v of CPU in 300ms", got)
	}
	name := fmt.Sprintf("test-hold-%d", os.Getpid())
	h, err := NewHold(name, []int{pid})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Freeze([]int{pid}); err != nil {
		t.Fatal(err)
	}
	origin := h.Origin()
	if got := cpu(); got != 0 {
		h.Release()
		t.Fatalf("held child used %v of CPU", got)
	}
	if err := h.Release(); err != nil {
		t.Fatal(err)
	}
	if got := cpu(); got < 50*time.Millisecond {
		t.Fatalf("released child used %v of CPU in 300ms", got)
	}
	if _, err := os.Stat(h.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("hold group left after release: %v", err)
	}
	// A hold found again by name (as gc finds one) kills its tree.
	if err := h.Freeze([]int{pid}); err != nil {
		t.Fatal(err)
	}
	h2, err := OpenHold(name, origin)
	if err != nil || h2 == nil {
		t.Fatalf("open hold: %v, %v", h2, err)
	}
	if err := h2.Kill(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("held child survived Kill")
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(h.Dir()), name)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("hold group left after kill: %v", err)
	}
	if h3, err := OpenHold(name, origin); err != nil || h3 != nil {
		t.Fatalf("open a hold that is gone: %v, %v", h3, err)
	}
}

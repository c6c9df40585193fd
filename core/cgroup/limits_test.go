package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCreateLimited: a shell in a group with pids.max 4 starts 3 of the 8
// children it asks for; the negative control, the same shell outside,
// starts all 8. The memory limit is written where the memory controller
// is; the group goes once empty.
func TestCreateLimited(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root (cgroups)")
	}
	// The shell prints each child it started; dash gives up at the first
	// fork that fails.
	children := func(g *Group) int {
		cmd := exec.Command("sh", "-c", "read x; for i in 1 2 3 4 5 6 7 8; do sleep 30 & echo $!; done")
		in, _ := cmd.StdinPipe()
		out, err := os.CreateTemp(t.TempDir(), "out") // a file: Wait does not wait for the sleeps
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		cmd.Stdout = out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if g != nil {
			if err := g.Add(cmd.Process.Pid); err != nil {
				t.Fatal(err)
			}
		}
		in.Write([]byte("go\n"))
		in.Close()
		cmd.Wait()
		b, _ := os.ReadFile(out.Name())
		pids := strings.Fields(string(b))
		for _, p := range pids {
			exec.Command("kill", "-KILL", p).Run()
		}
		return len(pids)
	}
	if n := children(nil); n != 8 {
		t.Fatalf("negative control: the shell started %d children outside a group, want 8", n)
	}
	name := fmt.Sprintf("test-limits-%d", os.Getpid())
	g, err := CreateLimited(name, Limits{PidsMax: 4, MemoryMax: 256 << 20})
	if err != nil {
		t.Skipf("SKIP: no pids and memory controllers to limit with: %v", err)
	}
	t.Cleanup(func() { g.Remove() })
	if n := children(g); n != 3 {
		t.Fatalf("the shell started %d children under pids.max 4, want 3", n)
	}
	var memSet bool
	for _, dir := range g.Paths {
		for _, f := range []string{"memory.limit_in_bytes", "memory.max"} {
			if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil && strings.TrimSpace(string(b)) == fmt.Sprint(256<<20) {
				memSet = true
			}
		}
	}
	if !memSet {
		t.Fatalf("no memory limit of 256 MiB in %v", g.Paths)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	for _, dir := range g.Paths {
		if _, err := os.Stat(dir); err == nil {
			t.Fatalf("%s left", dir)
		}
	}
}

package phaul

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

// TestGCStrayCRIU: a CRIU working in a migration's directory of the work
// dir whose migration has no journal entry is listed, and killed by gc
// (it holds no process); with the migration's entry present it is the
// entry's, not a stray.
func TestGCStrayCRIU(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.RequireCRIU(t)
	work := t.TempDir()
	const id = "0123456789abcdef"
	dir := filepath.Join(work, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	local, remote, err := linux.SeqpacketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	cmd := exec.Command(bin, "swrk", "3") // waits for requests on fd 3
	cmd.Dir, cmd.ExtraFiles = dir, []*os.File{remote}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	remote.Close()
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		cwd, _ := os.Readlink("/proc/" + itoa(cmd.Process.Pid) + "/cwd")
		return cwd == dir && isCRIU(cmd.Process.Pid), nil
	})

	j, err := openJournal(JournalDir(work), id, RoleSource, JournalEntry{Phase: PhaseRounds})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := GC(work, GCOptions{})
	if err != nil || len(rep.Leftovers) != 0 {
		t.Fatalf("with its migration's entry present: %+v, %v; want no stray", rep.Leftovers, err)
	}
	if err := j.remove(); err != nil {
		t.Fatal(err)
	}
	rep, err = GC(work, GCOptions{})
	if err != nil || len(rep.Leftovers) != 1 || rep.Leftovers[0].Kind != "criu" || !strings.HasPrefix(rep.Leftovers[0].Action, "kill") {
		t.Fatalf("GC --show: %+v, %v; want one stray criu to kill", rep.Leftovers, err)
	}
	if _, err := GC(work, GCOptions{Apply: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the stray criu still runs after gc")
	}
	if rep, err := GC(work, GCOptions{}); err != nil || len(rep.Leftovers) != 0 {
		t.Fatalf("second gc: %+v, %v; want nothing", rep.Leftovers, err)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

package images

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/phaul/phaul/test/testenv"
)

// TestReadTreeFacts has CRIU dump a real process (root, every capability,
// in this host's namespaces, with files open for reading and for writing)
// and reads back what a restore would make of it.
func TestReadTreeFacts(t *testing.T) {
	testenv.RequireRoot(t)
	criu := testenv.RequireCRIU(t)
	dir := t.TempDir()
	written := dir + "/written"
	cmd := exec.Command("sh", "-c", "exec 3>>"+written+"; exec sleep 100")
	// Its own session: CRIU refuses a task whose session leader is outside
	// its pid namespace, which the test's own session may be (CI runs
	// make under a leader CRIU cannot see).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	testenv.WaitFor(t, 5e9, func() (bool, error) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/comm")
		return err == nil && strings.TrimSpace(string(b)) == "sleep", nil
	})
	images := dir + "/images"
	os.Mkdir(images, 0o700)
	out, err := exec.Command(criu, "dump", "-t", strconv.Itoa(cmd.Process.Pid), "-D", images, "--shell-job", "-o", "dump.log").CombinedOutput()
	if err != nil {
		b, _ := os.ReadFile(images + "/dump.log")
		t.Fatalf("criu dump: %v\n%s\n%s", err, out, b)
	}
	facts, err := ReadTreeFacts(images)
	if err != nil {
		t.Fatal(err)
	}
	if len(facts.Tasks) != 1 {
		t.Fatalf("tasks %+v, want one", facts.Tasks)
	}
	task := facts.Tasks[0]
	if task.UIDs != [4]uint32{} || task.CapEff == 0 || task.CapEff&(1<<21) == 0 || task.CapBnd&(1<<21) == 0 { // CAP_SYS_ADMIN
		t.Errorf("task %+v: want uid 0 with CAP_SYS_ADMIN effective", task)
	}
	for _, ns := range []string{"net", "mnt", "pid", "ipc", "uts"} {
		if !slices.Contains(task.HostNS, ns) {
			t.Errorf("task shares %v with the host, want %s among them", task.HostNS, ns)
		}
	}
	var sawWritten, sawExe bool
	for _, f := range facts.Files {
		switch {
		case f.Path == written && f.Flags&uint32(os.O_WRONLY|os.O_RDWR|os.O_APPEND) != 0:
			sawWritten = true
		case strings.HasSuffix(f.Path, "/sleep"):
			sawExe = true
		}
	}
	if !sawWritten || !sawExe {
		t.Errorf("files %+v: want %s open for writing and the sleep binary", facts.Files, written)
	}
}

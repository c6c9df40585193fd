package dirty

import (
	"bufio"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/test/testenv"
)

// buildZoo compiles testdata/zoo.c once per test binary.
var buildZoo = sync.OnceValues(func() (string, error) { return compile("zoo") })

// zooMap is one mapping testdata/zoo.c made.
type zooMap struct {
	name string
	r    Range
}

// startZoo runs testdata/zoo.c and returns its pid and mappings once it
// is ready. Kinds the kernel refused are logged.
func startZoo(t *testing.T) (int, []zooMap) {
	t.Helper()
	testenv.RequireCommand(t, "cc")
	bin, err := buildZoo()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cmd := exec.Command(bin, dir) // it calls setsid itself
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	maps, err := readZoo(t, bufio.NewScanner(out))
	if err != nil {
		msg, _ := os.ReadFile(stderr.Name())
		t.Fatalf("zoo: %v\n%s", err, msg)
	}
	return cmd.Process.Pid, maps
}

// readZoo parses zoo's lines up to "ready".
func readZoo(t *testing.T, sc *bufio.Scanner) ([]zooMap, error) {
	var maps []zooMap
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 1 && f[0] == "ready":
			return maps, nil
		case len(f) > 1 && f[0] == "skip":
			t.Logf("SKIP kind: %s", strings.Join(f[1:], " "))
		case len(f) == 4 && f[0] == "map":
			start, err1 := strconv.ParseUint(f[2], 16, 64)
			end, err2 := strconv.ParseUint(f[3], 16, 64)
			if err1 != nil || err2 != nil || end <= start {
				return nil, fmt.Errorf("bad line %q", sc.Text())
			}
			maps = append(maps, zooMap{f[1], Range{start, end}})
		default:
			return nil, fmt.Errorf("unexpected line %q", sc.Text())
		}
	}
	return nil, fmt.Errorf("no ready line: %v", sc.Err())
}

// criuDump runs a plain `criu dump --leave-running` of pid into dir.
func criuDump(t *testing.T, criu string, pid int, dir string) {
	t.Helper()
	out, err := exec.Command(criu, "dump", "-t", strconv.Itoa(pid), "-D", dir,
		"--leave-running", "--shell-job", "-v4", "-o", "dump.log").CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "dump.log"))
		t.Fatalf("criu dump: %v\n%s\n%s", err, out, tailLines(string(log), 30))
	}
}

// pageSet is a set of page addresses.
type pageSet map[uint64]bool

// criuPages returns the pages of the dump's one task pagemap that have
// data in the dump (PE_PRESENT).
func criuPages(t *testing.T, dir string) pageSet {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		t.Fatal(err)
	}
	var task []string
	for _, name := range names {
		if k, ok := pagestore.ParsePagemapName(filepath.Base(name)); ok && k.Kind == pagestore.KindTask {
			task = append(task, name)
		}
	}
	if len(task) != 1 {
		t.Fatalf("dump has task pagemaps %v, want one", task)
	}
	f, err := os.Open(task[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pm, err := pagestore.ReadPagemap(f)
	if err != nil {
		t.Fatalf("%s: %v", task[0], err)
	}
	set := make(pageSet)
	for _, e := range pm.Entries {
		if e.Flags&pagestore.FlagPresent == 0 {
			continue
		}
		for i := uint64(0); i < e.NrPages; i++ {
			set[e.Vaddr+i*pageSize] = true
		}
	}
	return set
}

// phaulPages returns the pages pre-copy sends of pid: those of Mappings
// whose pagemap entries are Dumpable, as phaul/precopy.go reads them.
func phaulPages(t *testing.T, pid int) pageSet {
	t.Helper()
	zero, err := linux.ZeroPagePFN()
	if err != nil {
		t.Fatalf("zero page: %v", err)
	}
	return pagesWhere(t, pid, func(e linux.PagemapEntry) bool { return Dumpable(e, zero) })
}

// pagesWhere returns the pages of pid's Mappings whose pagemap entries
// pass keep.
func pagesWhere(t *testing.T, pid int, keep func(linux.PagemapEntry) bool) pageSet {
	t.Helper()
	rs, err := Mappings(pid)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := linux.OpenPagemap(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	set := make(pageSet)
	err = walkEntries(pm, rs, make([]linux.PagemapEntry, entriesChunk), func(at uint64, ents []linux.PagemapEntry) {
		for i, e := range ents {
			if keep(e) {
				set[at+uint64(i)*pageSize] = true
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// TestZooMatchesCRIU: for a process with one mapping of every kind CRIU's
// dump treats in its own way (testdata/zoo.c), the pages pre-copy sends
// (Mappings, Dumpable) are exactly the pages a plain CRIU dump writes into
// pagemap-PID.img, mapping by mapping, the process's other mappings
// (its binary, libc, heap, stack) included; so too while each tracker
// follows the process, as during pre-copy's final dump.
func TestZooMatchesCRIU(t *testing.T) {
	testenv.RequireRoot(t)
	criu := testenv.RequireCRIU(t)
	t.Run("untracked", func(t *testing.T) { checkZoo(t, criu, "") })
	eachKind(t, func(t *testing.T, kind string) { checkZoo(t, criu, kind) })
}

// checkZoo dumps a zoo, tracked by a tracker of kind unless "", and
// compares.
func checkZoo(t *testing.T, criu, kind string) {
	pid, zoo := startZoo(t)
	if kind != "" {
		collect(t, start(t, kind, pid))
	}
	// Phaul's final pass reads the process after CRIU has frozen and
	// infected it, before CRIU reads its pages: neither before the dump
	// nor after it. Infecting writes CRIU's syscall trampoline into the
	// first executable page, which so becomes an anonymous copy (dumped,
	// and sent by phaul); reading a page a uffd-wp marker holds (swapped
	// to pagemap, as to CRIU) maps the zero page there. So phaul's pages
	// are those it finds before the dump or after it.
	sent := phaulPages(t, pid)
	// Pages that hold only a uffd-wp marker: CRIU dumps them (swapped, to
	// it), phaul's final pass drops them (phaul/markers.go), so that the
	// destination holds what a dump of the untracked process would.
	markers := markerPages(t, pid)
	dir := t.TempDir()
	criuDump(t, criu, pid, dir)
	maps.Copy(sent, phaulPages(t, pid))
	dumped := criuPages(t, dir)
	for va := range markers {
		delete(dumped, va)
	}
	ms, err := linux.ReadMaps(pid)
	if err != nil {
		t.Fatal(err)
	}
	tb := newTable(zoo, ms)
	tb.add(dumped, sent)
	t.Logf("pages CRIU dumps and phaul sends, by mapping:\n%s", tb)
	for _, r := range tb.rows {
		if v := r.verdict(); v != "" {
			t.Errorf("%s (%s): %s", r.name, r.rule, v)
		}
		if r.name == "anon" && r.criu < 4 {
			t.Errorf("anon: CRIU dumped %d pages, not even the 4 written", r.criu)
		}
	}
}

// markerPages returns the pages of pid's tracked mappings that hold only a
// uffd-wp marker.
func markerPages(t *testing.T, pid int) pageSet {
	t.Helper()
	return pagesWhere(t, pid, linux.PagemapEntry.UffdWPMarker)
}

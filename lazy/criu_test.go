package lazy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/test/testenv"
)

const (
	workloadMiB  = 64
	criuTimeout  = time.Minute
	corruptIndex = 10 // page of the workload's region the negative control spoils
)

// TestCRIURestore has CRIU dump a self-checking workload plainly (its
// private pages land in pages-*.img flagged PE_PRESENT|PE_LAZY) and
// restore it with --lazy-pages while this package's daemon serves the lazy
// pages from the images: the workload must go on checking OK, and the
// daemon must report every lazy page delivered. The negative control
// serves one page of the workload's memory wrong: the workload must
// report exactly that page CORRUPT.
func TestCRIURestore(t *testing.T) {
	testenv.RequireRoot(t)
	criu := testenv.RequireCRIU(t)
	testenv.RequireKernelFeature(t, func() error { return linux.HaveUffdFeatures(linux.UffdFeatureEvents) })
	bin := buildC(t, "workload")
	for _, corrupt := range []bool{false, true} {
		t.Run(fmt.Sprintf("corrupt=%v", corrupt), func(t *testing.T) {
			w := startWorkload(t, bin)
			w.waitLine(t, "OK 2")
			dir := t.TempDir() // images and work dir
			criuRun(t, criu, dir, "dump", "-t", strconv.Itoa(w.pid), "--shell-job")
			if err := w.cmd.Wait(); err == nil || !strings.Contains(err.Error(), "killed") {
				t.Fatalf("workload after the dump: %v, want killed", err)
			}
			lazyPages := checkLazyPagemap(t, dir, w)

			src := NewImageSource(dir)
			defer src.Close()
			var s Source = src
			if corrupt {
				s = &corruptSource{Source: src, addr: w.region + corruptIndex*pageSize}
			}
			d, err := Listen(Config{WorkDir: dir, ImagesDir: dir, Source: s, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			srv := startServe(t, d, criuTimeout)

			pidfile := filepath.Join(t.TempDir(), "pid")
			criuRun(t, criu, dir, "restore", "--shell-job", "--lazy-pages", "-d", "--pidfile", pidfile)
			pid := readPid(t, pidfile)
			t.Cleanup(func() { killRestored(t, pid, bin) })
			if pid != w.pid {
				t.Fatalf("restored pid %d, dumped %d", pid, w.pid)
			}
			if err := srv.wait(); err != nil {
				t.Fatalf("serve: %v", err)
			}
			st := d.Stats()
			t.Logf("stats %+v", st)
			// The spoiled workload exits at once: its missing pages are
			// skipped then.
			if st.LazyPages < lazyPages || st.FaultPages+st.PushedPages+st.SkippedPages != st.LazyPages ||
				st.SkippedPages != 0 && !corrupt || st.Tasks != 1 {
				t.Fatalf("stats %+v: want all of at least %d lazy pages copied", st, lazyPages)
			}
			if corrupt {
				w.waitLine(t, fmt.Sprintf("CORRUPT page=%d ", corruptIndex))
				return
			}
			n := w.oks(t)
			w.waitLine(t, fmt.Sprintf("OK %d", n+3)) // three more full checks after the restore
			if lines := w.lines(t, "CORRUPT"); len(lines) > 0 {
				t.Fatalf("workload: %q", lines)
			}
		})
	}
}

// workload is the started test/workload.c process.
type workload struct {
	cmd    *exec.Cmd
	pid    int
	log    string // its stdout and stderr
	region uint64
	pages  uint64
}

func startWorkload(t *testing.T, bin string) *workload {
	t.Helper()
	w := &workload{log: filepath.Join(t.TempDir(), "workload.log")}
	out, err := os.Create(w.log)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close() // the child has its own
	// Its own session, no pipes: the restored copy must not depend on us.
	w.cmd = exec.Command(bin, strconv.Itoa(workloadMiB))
	w.cmd.Stdout, w.cmd.Stderr = out, out
	w.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.pid = w.cmd.Process.Pid
	t.Cleanup(func() {
		if w.cmd.ProcessState == nil {
			w.cmd.Process.Kill()
			w.cmd.Wait()
		}
	})
	line := w.waitLine(t, "REGION ")
	if _, err := fmt.Sscanf(line, "REGION %v %d", &w.region, &w.pages); err != nil {
		t.Fatalf("workload: %q: %v", line, err)
	}
	return w
}

// lines returns the log lines starting with prefix.
func (w *workload) lines(t *testing.T, prefix string) []string {
	t.Helper()
	data, err := os.ReadFile(w.log)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

// waitLine waits for a line starting with prefix and returns it.
func (w *workload) waitLine(t *testing.T, prefix string) string {
	t.Helper()
	var got string
	testenv.WaitFor(t, criuTimeout, func() (bool, error) {
		if l := w.lines(t, prefix); len(l) > 0 {
			got = l[0]
			return true, nil
		}
		if l := w.lines(t, "CORRUPT"); len(l) > 0 && !strings.HasPrefix(prefix, "CORRUPT") {
			return false, fmt.Errorf("workload: %q", l)
		}
		return false, nil
	})
	return got
}

// oks returns the number of the last OK round.
func (w *workload) oks(t *testing.T) int {
	t.Helper()
	ok := w.lines(t, "OK ")
	n, _ := strconv.Atoi(strings.TrimPrefix(ok[len(ok)-1], "OK "))
	return n
}

// criuRun runs CRIU on dir under a timeout that kills it (a restore can
// hang after a failed lazy transfer), failing t with its log's tail.
func criuRun(t *testing.T, criu, dir, action string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), criuTimeout)
	defer cancel()
	logName := action + ".log"
	argv := append([]string{action, "-D", dir, "-v4", "-o", logName}, args...)
	cmd := exec.CommandContext(ctx, criu, argv...)
	cmd.WaitDelay = 5 * time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, logName))
		lines := strings.Split(strings.TrimSpace(string(log)), "\n")
		t.Fatalf("criu %s: %v\n%s\nlog tail:\n%s", action, err, out, strings.Join(lines[max(0, len(lines)-30):], "\n"))
	}
}

// checkLazyPagemap checks that the dump put the workload's memory in its
// pages image flagged PE_PRESENT|PE_LAZY, and returns the task's lazy
// pages.
func checkLazyPagemap(t *testing.T, dir string, w *workload) uint64 {
	t.Helper()
	m, err := readImage(filepath.Join(dir, fmt.Sprintf("pagemap-%d.img", w.pid)), pagestore.ReadPagemap)
	if err != nil {
		t.Fatal(err)
	}
	var lazy, covered uint64
	end := w.region + w.pages*pageSize
	for _, e := range m.Entries {
		if e.Flags&pagestore.FlagLazy == 0 {
			continue
		}
		lazy += e.NrPages
		if e.Flags != pagestore.FlagPresent|pagestore.FlagLazy {
			t.Fatalf("lazy entry %+v: flags %d, want 6 (PRESENT|LAZY)", e, e.Flags)
		}
		s, x := max(e.Vaddr, w.region), min(e.Vaddr+e.NrPages*pageSize, end)
		if s < x {
			covered += (x - s) / pageSize
		}
	}
	if covered != w.pages {
		// Say what CRIU wrote for the region, to tell a CRIU that did not
		// mark it lazy from a region it did not find.
		var near []string
		for _, e := range m.Entries {
			if e.Vaddr < end && e.Vaddr+e.NrPages*pageSize > w.region {
				near = append(near, fmt.Sprintf("%#x+%d flags %d", e.Vaddr, e.NrPages, e.Flags))
			}
		}
		t.Fatalf("lazy entries cover %d of the workload's %d pages at %#x; entries over the region: %v (%d entries in all)",
			covered, w.pages, w.region, near, len(m.Entries))
	}
	return lazy
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// killRestored SIGKILLs the restored workload (if pid still runs bin) and
// waits until it is gone or a zombie.
func killRestored(t *testing.T, pid int, bin string) {
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err != nil || exe != bin {
		return
	}
	syscall.Kill(pid, syscall.SIGKILL)
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		st, err := linux.ReadProcessStat(pid)
		return errors.Is(err, fs.ErrNotExist) || err == nil && st.State == 'Z', nil
	})
}

// corruptSource serves one page wrong, once.
type corruptSource struct {
	Source
	addr uint64

	mu   sync.Mutex
	done bool // guarded by mu
}

func (s *corruptSource) ReadPages(ctx context.Context, id, vaddr uint64, buf []byte) error {
	if err := s.Source.ReadPages(ctx, id, vaddr, buf); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if vaddr <= s.addr && s.addr < vaddr+uint64(len(buf)) && !s.done {
		s.done = true
		buf[s.addr-vaddr+100] ^= 0xff
	}
	return nil
}

package dirty

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

// buildDir holds the built test programs; TestMain removes it.
var (
	buildDir     string
	buildDirOnce = sync.OnceValues(func() (string, error) {
		dir, err := os.MkdirTemp("", "dirty-test")
		buildDir = dir
		return dir, err
	})
)

// compile builds testdata/NAME.c into the build directory.
func compile(name string) (string, error) {
	dir, err := buildDirOnce()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, name)
	src := filepath.Join("testdata", name+".c")
	if out, err := exec.Command("cc", "-O2", "-Wall", "-o", bin, src).CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w\n%s", src, err, out)
	}
	return bin, nil
}

// buildChild compiles testdata/child.c once per test binary.
var buildChild = sync.OnceValues(func() (string, error) { return compile("child") })

// childBin returns the built child. Without a C compiler the test skips
// loudly, except on CI (CI=true), which must not skip it.
func childBin(t *testing.T) string {
	t.Helper()
	testenv.RequireCommand(t, "cc")
	bin, err := buildChild()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// child is a running testdata/child.c.
type child struct {
	t   *testing.T
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startChild(t *testing.T) *child {
	t.Helper()
	cmd := exec.Command(childBin(t))
	// Its own session: CRIU refuses a task whose session leader is outside
	// its PID namespace, as the test's own leader is when the tests run in
	// a PID namespace of their own (CI does).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{t: t, cmd: cmd, in: in, out: bufio.NewReader(out)}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	// Start returns once the exec is past its point of no return, before
	// the kernel has mapped the new image's vDSO: wait for the child to
	// say it runs.
	if line, err := c.out.ReadString('\n'); err != nil || strings.TrimSpace(line) != "ok ready" {
		t.Fatalf("child start: %q, %v", line, err)
	}
	return c
}

// do sends one command and returns the answer after "ok".
func (c *child) do(format string, args ...any) string {
	c.t.Helper()
	if _, err := fmt.Fprintf(c.in, format+"\n", args...); err != nil {
		c.t.Fatalf("child: %v", err)
	}
	line, err := c.out.ReadString('\n')
	if err != nil {
		c.t.Fatalf("child: %v", err)
	}
	ans, ok := strings.CutPrefix(strings.TrimSpace(line), "ok")
	if !ok {
		c.t.Fatalf("child answered %q to %q", line, fmt.Sprintf(format, args...))
	}
	return strings.TrimSpace(ans)
}

func (c *child) mmap(pages int) uint64 {
	c.t.Helper()
	a, err := strconv.ParseUint(c.do("map %d", pages), 16, 64)
	if err != nil {
		c.t.Fatal(err)
	}
	return a
}

func (c *child) write(addr uint64, pages ...int) {
	c.t.Helper()
	for _, p := range pages {
		c.do("write %x 1", addr+uint64(p)*pageSize)
	}
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// eachKind runs fn for every tracker; one that cannot work here skips
// with the reason.
func eachKind(t *testing.T, fn func(t *testing.T, kind string)) {
	for _, kind := range Kinds {
		t.Run(kind, func(t *testing.T) {
			if err := Available(kind); err != nil {
				t.Skipf("SKIP: %s does not work on this host: %v", kind, err)
			}
			fn(t, kind)
		})
	}
}

// in returns the pages of region [base, base+n pages) that rs holds, as
// page indexes.
func in(rs []Range, base uint64, n int) []int {
	var out []int
	end := base + uint64(n)*pageSize
	for _, r := range rs {
		for a := max(r.Start, base); a < min(r.End, end); a += pageSize {
			out = append(out, int((a-base)/pageSize))
		}
	}
	return out
}

func collect(t *testing.T, tr Tracker) []Range {
	t.Helper()
	rs, err := tr.Collect()
	if err != nil {
		t.Fatalf("%s collect: %v", tr.Kind(), err)
	}
	return rs
}

func start(t *testing.T, kind string, pid int) Tracker {
	t.Helper()
	tr, err := Start(kind, pid)
	if err != nil {
		t.Fatalf("start %s: %v", kind, err)
	}
	t.Cleanup(func() { tr.Stop() })
	return tr
}

func equal(a, b []int) bool { return fmt.Sprint(a) == fmt.Sprint(b) }

// TestTrackers runs every tracker available here through the changes a
// workload makes to its memory.
func TestTrackers(t *testing.T) {
	eachKind(t, func(t *testing.T, kind string) {
		{
			t.Run("writes", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(64)
				tr := start(t, kind, c.pid())
				if got := in(collect(t, tr), base, 64); len(got) != 0 {
					t.Fatalf("untouched region reported: pages %v", got)
				}
				c.write(base, 3, 4, 10, 63)
				if got := in(collect(t, tr), base, 64); !equal(got, []int{3, 4, 10, 63}) {
					t.Fatalf("wrote pages 3 4 10 63, reported %v", got)
				}
				// Written once, then idle: reported once.
				if got := in(collect(t, tr), base, 64); len(got) != 0 {
					t.Fatalf("idle pages reported again: %v", got)
				}
				c.write(base, 4)
				if got := in(collect(t, tr), base, 64); !equal(got, []int{4}) {
					t.Fatalf("wrote page 4 again, reported %v", got)
				}
			})
			t.Run("new mapping", func(t *testing.T) {
				c := startChild(t)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				base := c.mmap(8)
				if got := in(collect(t, tr), base, 8); !equal(got, []int{0, 1, 2, 3, 4, 5, 6, 7}) {
					t.Fatalf("new mapping reported as %v, want all of it", got)
				}
				c.write(base, 2)
				if got := in(collect(t, tr), base, 8); !equal(got, []int{2}) {
					t.Fatalf("wrote page 2 of the new mapping, reported %v", got)
				}
			})
			t.Run("moved mapping", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(16)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				moved, err := strconv.ParseUint(c.do("remap %x 16", base), 16, 64)
				if err != nil {
					t.Fatal(err)
				}
				if got := in(collect(t, tr), moved, 16); len(got) != 16 {
					t.Fatalf("moved mapping: %d of 16 pages reported, want all", len(got))
				}
				c.write(moved, 5)
				if got := in(collect(t, tr), moved, 16); !equal(got, []int{5}) {
					t.Fatalf("wrote page 5 of the moved mapping, reported %v", got)
				}
			})
			t.Run("removed mapping", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(16)
				keep := c.mmap(4)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				c.do("unmap %x 16", base)
				collect(t, tr)
				c.write(keep, 1)
				if got := in(collect(t, tr), keep, 4); !equal(got, []int{1}) {
					t.Fatalf("after an unmap, wrote page 1 of another mapping, reported %v", got)
				}
			})
			t.Run("unmapped and mapped again", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(16)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				c.do("unmap %x 16", base)
				again := c.mmap(16) // most likely the same place, unregistered
				c.write(again, 9)
				got := in(collect(t, tr), again, 16)
				// uffd-wp cannot vouch for any page of it; hash sees that
				// only page 9 differs from what was there before.
				if !slicesContains(got, 9) || (kind == KindUffdWP && len(got) != 16) {
					t.Fatalf("a fresh mapping at %#x (old %#x), page 9 written: reported %v", again, base, got)
				}
				c.write(again, 7)
				if got := in(collect(t, tr), again, 16); !equal(got, []int{7}) {
					t.Fatalf("reported %v, want [7]", got)
				}
			})
			t.Run("protect read-only then writable", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(8)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				c.do("protect %x 8 ro", base)
				collect(t, tr)
				c.do("protect %x 8 rw", base)
				c.write(base, 6)
				if got := in(collect(t, tr), base, 8); !slicesContains(got, 6) {
					t.Fatalf("write after mprotect rw not reported: %v", got)
				}
			})
			t.Run("fork", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(8)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				kid, _ := strconv.Atoi(c.do("fork"))
				defer func() {
					if p, err := os.FindProcess(kid); err == nil {
						p.Kill()
					}
				}()
				c.write(base, 1)
				if got := in(collect(t, tr), base, 8); !slicesContains(got, 1) {
					t.Fatalf("write after fork not reported: %v", got)
				}
				c.write(base, 3)
				if got := in(collect(t, tr), base, 8); !equal(got, []int{3}) {
					t.Fatalf("second write after fork: reported %v, want [3]", got)
				}
			})
			t.Run("dontneed", func(t *testing.T) {
				c := startChild(t)
				base := c.mmap(8)
				tr := start(t, kind, c.pid())
				collect(t, tr)
				c.do("dontneed %x 2", base+4*pageSize)
				if got := in(collect(t, tr), base, 8); !slicesContains(got, 4) || !slicesContains(got, 5) {
					t.Fatalf("pages dropped with MADV_DONTNEED not reported: %v", got)
				}
			})
		}
	})
}

func slicesContains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestStopLeavesNoTrace: after Stop the child's memory is as it was, it
// holds no userfaultfd, no mapping keeps the uffd-wp flag, and it runs on.
func TestStopLeavesNoTrace(t *testing.T) {
	eachKind(t, func(t *testing.T, kind string) {
		{
			c := startChild(t)
			base := c.mmap(32)
			before := c.do("sum %x 32", base)
			tr := start(t, kind, c.pid())
			collect(t, tr)
			if err := tr.Stop(); err != nil {
				t.Fatal(err)
			}
			if err := tr.Stop(); err != nil {
				t.Fatalf("second stop: %v", err)
			}
			if after := c.do("sum %x 32", base); after != before {
				t.Fatalf("memory checksum %s after tracking, %s before", after, before)
			}
			if left, err := Leftovers(c.pid()); err != nil || len(left) > 0 {
				t.Fatalf("after stop the child keeps %v (%v)", left, err)
			}
			c.write(base, 1)
			c.do("sum %x 32", base)
		}
	})
}

// TestTrackedChildHoldsNoUffd: while tracking, the child itself holds no
// userfaultfd (CRIU refuses to dump a task that does): phaul's copy is
// the only one.
func TestTrackedChildHoldsNoUffd(t *testing.T) {
	if err := Available(KindUffdWP); err != nil {
		t.Skipf("SKIP: %v", err)
	}
	c := startChild(t)
	c.mmap(4)
	tr := start(t, KindUffdWP, c.pid())
	collect(t, tr)
	if fds, err := uffdDescriptors(c.pid()); err != nil || len(fds) > 0 {
		t.Fatalf("tracked child holds %v (%v)", fds, err)
	}
}

// TestCopyConverges is what pre-copy relies on: a copy of a region kept by
// reading, each round, what Collect reported, equals the region at the
// end. The negative control drops one round's report and must differ.
func TestCopyConverges(t *testing.T) {
	eachKind(t, func(t *testing.T, kind string) {
		for _, drop := range []bool{false, true} {
			t.Run(fmt.Sprintf("drop=%v", drop), func(t *testing.T) {
				const n = 256
				c := startChild(t)
				base := c.mmap(n)
				tr := start(t, kind, c.pid())
				buf := make([]byte, n*pageSize)
				// Round 1: protect first (Start), then read everything.
				read(t, c.pid(), base, buf)
				copyOf := bytes.Clone(buf)
				rng := rand.New(rand.NewPCG(1, 2))
				for round := range 6 {
					for range 20 {
						c.write(base, rng.IntN(n))
					}
					rs := collect(t, tr)
					if drop && round == 2 {
						continue // the bug the control stands for
					}
					for _, p := range in(rs, base, n) {
						off := p * pageSize
						read(t, c.pid(), base+uint64(off), copyOf[off:off+pageSize])
					}
				}
				read(t, c.pid(), base, buf)
				same := bytes.Equal(buf, copyOf)
				if !drop && !same {
					t.Fatal("the copy differs from the region: a write was missed")
				}
				if drop && same {
					t.Fatal("negative control: dropping a round's report went unnoticed")
				}
			})
		}
	})
}

func read(t *testing.T, pid int, addr uint64, buf []byte) {
	t.Helper()
	n, err := linux.ReadProcessMemory(pid, addr, buf)
	if err != nil || n != len(buf) {
		t.Fatalf("read %#x+%d of %d: %d, %v", addr, len(buf), pid, n, err)
	}
}

func TestStartRefuses(t *testing.T) {
	if _, err := Start("magic", os.Getpid()); err == nil {
		t.Fatal("unknown kind accepted")
	}
	if _, err := Start(KindHash, 1<<30); err == nil {
		t.Fatal("missing process accepted")
	}
	if err := Available(KindSoftDirty); err != nil && !errors.Is(err, ErrUnavailable) {
		t.Fatalf("soft-dirty: %v", err)
	}
}

func TestAppendSoftDirty(t *testing.T) {
	// Recorded pagemap entries: present, present+soft-dirty, swapped+
	// soft-dirty, none, present+soft-dirty+exclusive.
	ents := []linux.PagemapEntry{1 << 63, 1<<63 | 1<<55, 1<<62 | 1<<55, 0, 1<<63 | 1<<55 | 1<<56}
	got := appendSoftDirty(nil, 0x10000, ents)
	want := []Range{{0x11000, 0x13000}, {0x14000, 0x15000}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("appendSoftDirty = %v, want %v", got, want)
	}
}

func TestCoveredMerge(t *testing.T) {
	rs := []Range{{0x1000, 0x3000}, {0x3000, 0x5000}, {0x8000, 0x9000}}
	for _, tc := range []struct {
		r    Range
		want bool
	}{
		{Range{0x1000, 0x5000}, true}, {Range{0x2000, 0x4000}, true}, {Range{0x4000, 0x6000}, false},
		{Range{0x8000, 0x9000}, true}, {Range{0x0, 0x1000}, false}, {Range{0x5000, 0x8000}, false},
	} {
		if got := covered(rs, tc.r); got != tc.want {
			t.Errorf("covered(%v) = %v", tc.r, got)
		}
	}
	m := merge([]Range{{0x8000, 0x9000}, {0x1000, 0x2000}, {0x2000, 0x3000}, {0x2800, 0x4000}})
	if fmt.Sprint(m) != fmt.Sprint([]Range{{0x1000, 0x4000}, {0x8000, 0x9000}}) {
		t.Fatalf("merge = %v", m)
	}
}

// TestCRIUDumpsTrackedChild: CRIU dumps a process while phaul tracks it
// (the process holds no userfaultfd of its own), and the tracking goes on.
func TestCRIUDumpsTrackedChild(t *testing.T) {
	if err := Available(KindUffdWP); err != nil {
		t.Skipf("SKIP: %v", err)
	}
	bin, err := criu.Locate(context.Background(), testenv.RequireCRIU(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := startChild(t)
	base := c.mmap(32)
	tr := start(t, KindUffdWP, c.pid())
	collect(t, tr)
	c.write(base, 2)
	dir := t.TempDir()
	err = bin.Dump(context.Background(), criu.DumpRequest{Pid: c.pid(), ImagesDir: dir, LeaveRunning: true,
		Options: criu.Options{ShellJob: true}}, nil)
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "dump.log"))
		t.Fatalf("criu dump of a tracked child: %v\n%s", err, tailLines(string(log), 20))
	}
	c.write(base, 5)
	if got := in(collect(t, tr), base, 32); !slicesContains(got, 2) || !slicesContains(got, 5) {
		t.Fatalf("after the dump: reported %v, want pages 2 and 5 among them", got)
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestWrittenAfterSent: a page is collected, changed before the sender
// reads it, and changed back before the next collect, as a lock word
// flips. The destination holds the sender's read, so the next collect must
// report the page again; a tracker that compares content compares with
// what was sent (ContentTracker.Sent), not with what it read.
func TestWrittenAfterSent(t *testing.T) {
	eachKind(t, func(t *testing.T, kind string) {
		c := startChild(t)
		base := c.mmap(4)
		tr := start(t, kind, c.pid())
		collect(t, tr)
		c.do("poke %x 5", base)
		if got := in(collect(t, tr), base, 4); !equal(got, []int{0}) {
			t.Fatalf("poked page 0, reported %v", got)
		}
		c.do("poke %x 9", base) // before the sender reads it
		sent := make([]byte, pageSize)
		if n, err := linux.ReadProcessMemory(c.pid(), base, sent); err != nil || n != len(sent) {
			t.Fatalf("read page: %d, %v", n, err)
		}
		if ct, ok := tr.(ContentTracker); ok {
			ct.Sent(base, sent)
		}
		c.do("poke %x 5", base) // back to what the collect read
		if got := in(collect(t, tr), base, 4); !equal(got, []int{0}) {
			t.Fatalf("page 0 differs from what was sent, reported %v", got)
		}
	})
}

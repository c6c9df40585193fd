package lazy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

// harness runs a Daemon for one uffdchild.
type harness struct {
	*server
	lay layout
	dir string // images and work dir
	c   *child
}

const childID = 4242

func newHarness(t *testing.T, lay layout, src Source) *harness {
	t.Helper()
	testenv.RequireRoot(t) // EVENT_FORK needs CAP_SYS_PTRACE
	testenv.RequireKernelFeature(t, func() error { return linux.HaveUffdFeatures(linux.UffdFeatureEvents) })
	bin := buildC(t, "uffdchild")
	dir := t.TempDir()
	lay.write(t, dir, childID)
	d, err := Listen(Config{WorkDir: dir, ImagesDir: dir, Source: src, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{server: startServe(t, d, answerTimeout), lay: lay, dir: dir}
	h.c = startChild(t, bin, filepath.Join(dir, SocketName), childID, lay.args())
	return h
}

// done waits for Serve and checks the account: every lazy page copied
// (into the restored task; a forked child's count on top) or skipped, and
// exactly skipped pages skipped.
func (h *harness) done(t *testing.T, skipped uint64) Stats {
	t.Helper()
	return h.doneSkipping(t, skipped, skipped)
}

// doneSkipping is done with minSkipped to maxSkipped pages skipped.
func (h *harness) doneSkipping(t *testing.T, minSkipped, maxSkipped uint64) Stats {
	t.Helper()
	if err := h.wait(); err != nil {
		t.Fatalf("serve: %v", err)
	}
	if n := uffdFDs(t); n != 0 {
		t.Errorf("%d userfaultfds open after Serve", n)
	}
	s := h.d.Stats()
	t.Logf("stats %+v", s)
	copied := s.FaultPages + s.PushedPages + s.SkippedPages
	if !s.Done || s.LazyPages != h.lay.lazyPages() || s.SkippedPages < minSkipped || s.SkippedPages > maxSkipped ||
		(s.Tasks == 1) != (copied == s.LazyPages) || copied < s.LazyPages {
		t.Fatalf("stats %+v: want done, %d lazy pages, %d-%d skipped, all accounted for",
			s, h.lay.lazyPages(), minSkipped, maxSkipped)
	}
	return s
}

func newLayout(r3 uint64) layout { return layout{base: 0x6f0000000000, r3: r3} }

// TestChild serves a real process on a real userfaultfd: uffdchild speaks
// CRIU's restore side of the protocol and checks every page it reads
// against the pattern the Source serves, after the daemon is done too.
func TestChild(t *testing.T) {
	tests := []struct {
		name string
		r3   uint64
		run  func(t *testing.T, h *harness)
	}{
		{"faults before the finish", 4 * mib, func(t *testing.T, h *harness) {
			c, l := h.c, h.lay
			c.do(t, "touch 3000 1")
			c.do(t, "write %#x 0x1111", l.r1()+8)
			c.do(t, "write %#x 0x2222", l.hole()+8) // not lazy: a zero page
			c.do(t, "write %#x 0x3333", l.r3b()+mib+16)
			c.do(t, "touch 1000 2")
			if s := h.d.Stats(); s.FaultPages == 0 || s.PushedPages != 0 || s.ZeroPages == 0 {
				t.Fatalf("before the finish: %+v, want faults, zero pages and no background", s)
			}
			c.do(t, "finish")
			s := h.done(t, 0)
			c.do(t, "check")
			t.Logf("%d faults: latency p50 %v p99 %v max %v", s.Faults, s.FaultP50, s.FaultP99, s.FaultMax)
		}},
		{"background fill", 256 * mib, func(t *testing.T, h *harness) {
			h.c.do(t, "finish")
			s := h.done(t, 0)
			h.c.do(t, "check")
			t.Logf("filled %d pages in %v: %.0f MiB/s", s.PushedPages, s.FillTime,
				float64(s.PushedPages*pageSize)/mib/s.FillTime.Seconds())
		}},
		{"faults during the fill", 256 * mib, func(t *testing.T, h *harness) {
			h.c.do(t, "finish")
			h.c.do(t, "touch 2000 11")
			s := h.done(t, 0)
			h.c.do(t, "check")
			t.Logf("%d faults during the fill: latency p50 %v p99 %v max %v; fill %v", s.Faults,
				s.FaultP50, s.FaultP99, s.FaultMax, s.FillTime)
		}},
		{"fork", 16 * mib, func(t *testing.T, h *harness) {
			c, l := h.c, h.lay
			c.do(t, "touch 500 3")
			c.do(t, "write %#x 1", l.r3b()+8)
			c.do(t, "fork 300 7")
			if got := c.next(t, c.clines); got != "ok touched 300" {
				t.Fatalf("forked child: %s", got)
			}
			c.do(t, "write %#x 2", l.r3b()+8) // the child keeps 1
			c.do(t, "finish")
			if s := h.done(t, 0); s.Tasks != 2 {
				t.Fatalf("%d tasks, want 2", s.Tasks)
			}
			c.do(t, "check")
			if got := c.next(t, c.clines); !strings.HasPrefix(got, "ok checked") {
				t.Fatalf("forked child: %s", got)
			}
		}},
		{"mremap", 4 * mib, func(t *testing.T, h *harness) {
			c, l := h.c, h.lay
			c.do(t, "touch 200 4")
			to := l.base + 1<<30
			c.do(t, "remap %#x %#x %#x", l.r3b()+mib, 256<<10, to)
			c.do(t, "touch 500 5")
			c.do(t, "write %#x 7", to+8)
			c.do(t, "finish")
			h.done(t, 0)
			c.do(t, "check")
		}},
		{"munmap", 4 * mib, func(t *testing.T, h *harness) {
			h.c.do(t, "unmap %#x %#x", h.lay.r3b()+2*mib, 128<<10)
			h.c.do(t, "finish")
			h.done(t, 32)
			h.c.do(t, "check")
		}},
		{"vma split since the dump", 4 * mib, func(t *testing.T, h *harness) {
			h.c.do(t, "protect %#x %#x", h.lay.r3b()+mib+12<<10, 8<<10)
			h.c.do(t, "finish")
			h.done(t, 0)
			h.c.do(t, "check")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.run(t, newHarness(t, newLayout(tt.r3), &patternSource{}))
		})
	}
}

// TestChildDetach: a task that stays held (it never touches its memory
// and sends no finish marker) gets every lazy page at Detach, and Serve
// ends with the userfaultfd closed; the task's later finish marker still
// goes through (the daemon kept its end of the connection) and it finds
// its memory complete without a daemon. Without Detach, a daemon that
// ends leaves the finish marker nowhere to go: CRIU's restore fails there
// and kills the tree, rather than run it with pages missing. Detach waits
// for every task pstree.img lists.
func TestChildDetach(t *testing.T) {
	t.Run("detached", func(t *testing.T) {
		h := newHarness(t, newLayout(16*mib), &patternSource{})
		writeFile(t, h.dir, "pstree.img", pstreeImage(childID))
		if err := h.d.Detach(); err != nil {
			t.Fatal(err)
		}
		if s := h.done(t, 0); s.FaultPages != 0 || s.PushedPages != s.LazyPages {
			t.Fatalf("stats %+v: want every lazy page pushed, none faulted", s)
		}
		if err := h.d.Detach(); !errors.Is(err, ErrDetached) {
			t.Fatalf("second Detach: %v, want ErrDetached", err)
		}
		h.c.do(t, "finish")
		h.c.do(t, "check")
	})
	t.Run("not detached", func(t *testing.T) {
		h := newHarness(t, newLayout(4*mib), &patternSource{})
		h.cancel()
		if err := h.wait(); err == nil {
			t.Fatal("serve ended early without an error")
		}
		if got := h.c.ask(t, "finish"); !strings.HasPrefix(got, "FAIL send finish") {
			t.Fatalf("finish after the daemon ended: %q, want FAIL send finish", got)
		}
	})
	t.Run("waits for every task", func(t *testing.T) {
		h := newHarness(t, newLayout(4*mib), &patternSource{})
		writeFile(t, h.dir, "pstree.img", pstreeImage(childID, childID+1))
		if err := h.d.Detach(); err != nil {
			t.Fatal(err)
		}
		testenv.WaitFor(t, answerTimeout, func() (bool, error) {
			s := h.d.Stats()
			return s.PushedPages == s.LazyPages && s.LazyPages > 0, nil
		})
		select {
		case err := <-h.served:
			t.Fatalf("serve ended (%v) with a task pstree.img lists missing", err)
		default:
		}
	})
}

// TestChildMadviseDuringFill drops pages (MADV_DONTNEED) while the
// background read covering them is in flight: the data arriving after the
// REMOVE event must not be copied, the pages must read as zeros. Faults
// meanwhile are served: they never wait behind a background read.
func TestChildMadviseDuringFill(t *testing.T) {
	lay := newLayout(8 * mib)
	lo := lay.r3b() + 3*mib + 32<<10
	src := &patternSource{gateLo: lo, gateHi: lo + 64<<10, gate: make(chan struct{}), gated: make(chan struct{})}
	h := newHarness(t, lay, src)
	h.c.do(t, "finish")
	select {
	case <-src.gated:
	case <-time.After(answerTimeout):
		t.Fatal("no read of the gated range")
	}
	before := h.d.Stats().FaultPages
	h.c.do(t, "touch 300 13")
	if s := h.d.Stats(); s.FaultPages == before {
		t.Fatalf("no fault served while the background read waits: %+v", s)
	}
	h.c.do(t, "madvise %#x %#x", lo, 64<<10) // returns once the daemon read REMOVE
	close(src.gate)
	h.doneSkipping(t, 1, 16) // the touches may have faulted some in first
	h.c.do(t, "check")
}

// TestChildCatchesCorruption is the negative control: a Source that serves
// one wrong page once must be caught by the child.
func TestChildCatchesCorruption(t *testing.T) {
	lay := newLayout(4 * mib)
	bad := lay.r3b() + 5*pageSize
	h := newHarness(t, lay, &patternSource{corrupt: bad})
	h.c.do(t, "finish")
	h.done(t, 0)
	got := h.c.ask(t, "check")
	if want := fmt.Sprintf("CORRUPT addr=%#x ", bad); !strings.HasPrefix(got, want) {
		t.Fatalf("check: %q, want %q...", got, want)
	}
}

// uffdFDs counts this process's open userfaultfds.
func uffdFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); l == "anon_inode:[userfaultfd]" {
			n++
		}
	}
	return n
}

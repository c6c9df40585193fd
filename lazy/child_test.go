package lazy

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/test/testenv"
)

// layout is the memory of a uffdchild, from base on:
//
//	R1 [0, 8M) rw, with a hole [1M, 1M+16K) no pagemap entry covers and
//	   eager (PE_PRESENT only) pages at [4M, 4M+64K)
//	R2 [8M, 9M) read-only, adjacent to R1: one lazy entry spans both
//	S  [12M, 13M) in the images only, shared anonymous: its lazy entry
//	   must be ignored (CRIU never registers such a VMA)
//	R3 [16M, 16M+r3) rw, lazy
type layout struct{ base, r3 uint64 }

const mib = 1 << 20

func (l layout) r1() uint64   { return l.base }
func (l layout) r3b() uint64  { return l.base + 16*mib }
func (l layout) hole() uint64 { return l.base + mib }

func (l layout) entries() []pagestore.Entry {
	b, lazy, p := l.base, pagestore.FlagLazy, pagestore.FlagPresent
	pg := func(n uint64) uint64 { return n / pageSize }
	return []pagestore.Entry{
		{Vaddr: b, NrPages: pg(mib), Flags: lazy},
		{Vaddr: b + mib + 16<<10, NrPages: pg(3*mib - 16<<10), Flags: lazy | p},
		{Vaddr: b + 4*mib, NrPages: pg(64 << 10), Flags: p},
		{Vaddr: b + 4*mib + 64<<10, NrPages: pg(5*mib - 64<<10), Flags: lazy},
		{Vaddr: b + 12*mib, NrPages: pg(mib), Flags: lazy},
		{Vaddr: l.r3b(), NrPages: pg(l.r3), Flags: lazy},
	}
}

// lazyPages is what the daemon must serve: all lazy entries but S's.
func (l layout) lazyPages() uint64 { return (9*mib - 16<<10 - 64<<10 + l.r3) / pageSize }

func (l layout) write(t *testing.T, dir string, id uint64) {
	t.Helper()
	const rw, r = 3, 1
	vmas := []testVMA{
		anonVMA(l.base, l.base+8*mib, rw),
		anonVMA(l.base+8*mib, l.base+9*mib, r),
		{start: l.base + 12*mib, end: l.base + 13*mib, prot: rw, flags: 0x01 | mapAnonymous, status: 1 | 1<<8},
		anonVMA(l.r3b(), l.r3b()+l.r3, rw),
	}
	writeTaskImages(t, dir, id, l.entries(), vmas)
}

func (l layout) args() []string {
	return []string{
		fmt.Sprintf("map:%#x:%#x:rw", l.base, 8*mib),
		fmt.Sprintf("map:%#x:%#x:r", l.base+8*mib, mib),
		fmt.Sprintf("map:%#x:%#x:rw", l.r3b(), l.r3),
		fmt.Sprintf("fill:%#x:%#x", l.base+4*mib, 64<<10),
		fmt.Sprintf("zero:%#x:%#x", l.hole(), 16<<10),
	}
}

// buildC compiles testdata/<name>.c.
func buildC(t *testing.T, name string) string {
	t.Helper()
	testenv.RequireCommand(t, "cc") // skips loudly; fails on CI
	bin := filepath.Join(t.TempDir(), name)
	src := filepath.Join("testdata", name+".c")
	if out, err := exec.Command("cc", "-O2", "-Wall", "-Wextra", "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("cc %s: %v\n%s", src, err, out)
	}
	return bin
}

// child is a running uffdchild: commands go to its stdin, its answers
// come back as lines (a forked child's on clines).
type child struct {
	cmd    *exec.Cmd
	in     *os.File
	lines  chan string
	clines chan string
}

const answerTimeout = 20 * time.Second

func startChild(t *testing.T, bin, sock string, id uint64, args []string) *child {
	t.Helper()
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	c := &child{in: inW, lines: make(chan string, 16), clines: make(chan string, 16)}
	c.cmd = exec.Command(bin, append([]string{sock, fmt.Sprint(id)}, args...)...)
	c.cmd.Stdin, c.cmd.Stdout, c.cmd.Stderr = inR, outW, outW
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // its forked child too
	err = c.cmd.Start()
	inR.Close()
	outW.Close()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // ends at EOF: once every process of the group is gone
		defer close(done)
		defer close(c.lines)
		defer close(c.clines)
		sc := bufio.NewScanner(outR)
		for sc.Scan() {
			if line, ok := strings.CutPrefix(sc.Text(), "child: "); ok {
				c.clines <- line
			} else {
				c.lines <- sc.Text()
			}
		}
	}()
	t.Cleanup(func() {
		syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		c.cmd.Wait()
		inW.Close()
		for range c.lines { // unblock the reader if nobody read
		}
		for range c.clines {
		}
		<-done
		outR.Close()
	})
	if got := c.next(t, c.lines); got != "ok ready" {
		t.Fatalf("child: %q, want ok ready", got)
	}
	return c
}

func (c *child) next(t *testing.T, ch chan string) string {
	t.Helper()
	select {
	case line, ok := <-ch:
		if !ok {
			t.Fatalf("child: output ended")
		}
		return line
	case <-time.After(answerTimeout):
		t.Fatalf("child: no answer in %v", answerTimeout)
	}
	return ""
}

// ask runs one command and returns its answer.
func (c *child) ask(t *testing.T, format string, args ...any) string {
	t.Helper()
	cmd := fmt.Sprintf(format, args...)
	if _, err := fmt.Fprintln(c.in, cmd); err != nil {
		t.Fatalf("child: %s: %v", cmd, err)
	}
	return c.next(t, c.lines)
}

// do runs one command, failing t unless the answer is ok.
func (c *child) do(t *testing.T, format string, args ...any) string {
	t.Helper()
	line := c.ask(t, format, args...)
	if !strings.HasPrefix(line, "ok") {
		t.Fatalf("child: %s: %s", fmt.Sprintf(format, args...), line)
	}
	return line
}

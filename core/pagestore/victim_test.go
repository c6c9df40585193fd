package pagestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/test/testenv"
)

// The file-private victim: the test binary re-executed with victimEnv set
// to a directory. It maps victimFile (victimPages pages of victimFill)
// MAP_PRIVATE, writes zeros over page victimZero and an 'X' into page
// victimX, then checks every page each 20 ms, logging "ok N" or
// "BAD page=I" (then it only waits to be killed) to victimLog.
const (
	victimEnv   = "PAGESTORE_VICTIM"
	victimFile  = "data"
	victimLog   = "victim.log"
	victimPages = 16
	victimFill  = 0xab
	victimZero  = 3
	victimX     = 5
)

func runVictim(dir string) {
	log, err := os.OpenFile(filepath.Join(dir, victimLog), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		os.Exit(2)
	}
	f, err := os.Open(filepath.Join(dir, victimFile))
	if err != nil {
		fmt.Fprintf(log, "FAIL open: %v\n", err)
		os.Exit(2)
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, victimPages*PageSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	f.Close()
	if err != nil {
		fmt.Fprintf(log, "FAIL mmap: %v\n", err)
		os.Exit(2)
	}
	clear(mem[victimZero*PageSize : (victimZero+1)*PageSize]) // a private copy, all zeros
	mem[victimX*PageSize] = 'X'
	want := victimContent()
	for n := 0; ; n++ {
		for i := range victimPages {
			if !bytes.Equal(mem[i*PageSize:(i+1)*PageSize], want[i*PageSize:(i+1)*PageSize]) {
				// Stay alive: a tree that exits before CRIU detached
				// from it makes the restore fail ("Unable to detach").
				fmt.Fprintf(log, "BAD page=%d\n", i)
				select {}
			}
		}
		fmt.Fprintf(log, "ok %d\n", n)
		time.Sleep(20 * time.Millisecond) // the victim's own pace, not test synchronisation
	}
}

// victimContent is what the victim's mapping must hold.
func victimContent() []byte {
	b := bytes.Repeat([]byte{victimFill}, victimPages*PageSize)
	clear(b[victimZero*PageSize : (victimZero+1)*PageSize])
	b[victimX*PageSize] = 'X'
	return b
}

// TestZeroPageOfFilePrivateMapping shows why zero pages stay in the
// pagemap as present (sparse holes in pages-*.img) rather than being left
// out: a page of a MAP_PRIVATE file mapping that the process zeroed must
// restore as zeros, while a page the pagemap lacks is restored from the
// file. The negative control leaves that zero page out and the restored
// victim sees the file's bytes.
func TestZeroPageOfFilePrivateMapping(t *testing.T) {
	testenv.RequireRoot(t)
	path := testenv.RequireCRIU(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bin, err := criu.Locate(ctx, path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, omit := range []bool{false, true} {
		t.Run(fmt.Sprintf("omit zero page %v", omit), func(t *testing.T) {
			dir := t.TempDir()
			fill := bytes.Repeat([]byte{victimFill}, victimPages*PageSize)
			if err := os.WriteFile(filepath.Join(dir, victimFile), fill, 0o600); err != nil {
				t.Fatal(err)
			}
			pid := startVictim(t, dir)
			oks := waitVictim(t, dir, 3)
			dumpDir := t.TempDir()
			region := victimRegion(t, pid, dir)
			if err := bin.Dump(ctx, criu.DumpRequest{Pid: pid, ImagesDir: dumpDir}, nil); err != nil {
				t.Fatalf("dump: %v", err)
			}
			dumped := readImages(t, dumpDir)
			var k Key
			for key := range dumped {
				k = key
			}
			zeroAddr := region + victimZero*PageSize
			if p, ok := dumped[k].pagesOf()[zeroAddr]; !ok || p.flags != FlagPresent || !bytes.Equal(p.data, zeroPage[:]) {
				t.Fatalf("dump: zeroed page of the file mapping: flags %d, found %v", p.flags, ok)
			}

			images := filepath.Join(t.TempDir(), "images")
			copyOtherImages(t, dumpDir, images)
			s := newTestStore(t, Config{Dir: images})
			loadImages(t, s, dumped, 64)
			if omit {
				s = storeWithout(t, s, dumped, images, k, zeroAddr)
			} else if st := s.Stats().Keys[k]; st.ZeroPages == 0 {
				t.Fatalf("no zero page in the store: %+v", st)
			}
			if err := s.Commit(); err != nil {
				t.Fatal(err)
			}
			restored, err := bin.Restore(ctx, criu.RestoreRequest{ImagesDir: images}, nil)
			if err != nil {
				t.Fatalf("restore: %v", err)
			}
			t.Cleanup(func() { syscall.Kill(restored, syscall.SIGKILL) })
			if !omit {
				waitVictim(t, dir, oks+10)
				return
			}
			testenv.WaitFor(t, 30*time.Second, func() (bool, error) {
				return victimBad(t, dir) != "", nil
			})
			if bad := victimBad(t, dir); bad != fmt.Sprintf("BAD page=%d", victimZero) {
				t.Fatalf("victim reported %q, want the zero page", bad)
			}
		})
	}
}

// startVictim starts the victim for dir and returns its host pid.
func startVictim(t *testing.T, dir string) int {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(filepath.Join(dir, "victim.out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command(self, "-test.run=^$")
	cmd.Env = append(os.Environ(), victimEnv+"="+dir)
	cmd.Stdout, cmd.Stderr = out, out
	// Its own PID namespace, so the restored copy gets its pids back, and
	// its own session, as CRIU wants the root of a tree.
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID, Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // owned by this test; cleanup waits for it
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(out.Name())
			t.Logf("victim output:\n%s", b)
		}
	})
	return cmd.Process.Pid
}

// waitVictim waits until the victim logged n ok lines, and returns how
// many it logged. A BAD line fails the test.
func waitVictim(t *testing.T, dir string, n int) int {
	t.Helper()
	var got int
	testenv.WaitFor(t, 30*time.Second, func() (bool, error) {
		if bad := victimBad(t, dir); bad != "" {
			return false, errors.New("victim: " + bad)
		}
		got = victimOKs(t, dir)
		return got >= n, nil
	})
	return got
}

func victimLines(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, victimLog))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	text := string(b)
	if i := strings.LastIndexByte(text, '\n'); i >= 0 {
		return strings.Split(text[:i], "\n")
	}
	return nil
}

func victimOKs(t *testing.T, dir string) int {
	n := 0
	for _, l := range victimLines(t, dir) {
		if strings.HasPrefix(l, "ok ") {
			n++
		}
	}
	return n
}

func victimBad(t *testing.T, dir string) string {
	for _, l := range victimLines(t, dir) {
		if strings.HasPrefix(l, "BAD") || strings.HasPrefix(l, "FAIL") {
			return l
		}
	}
	return ""
}

// victimRegion returns the start of the victim's mapping of its file,
// from /proc/pid/maps.
func victimRegion(t *testing.T, pid int, dir string) uint64 {
	t.Helper()
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(maps), "\n") {
		if f := strings.Fields(l); len(f) == 6 && f[5] == filepath.Join(dir, victimFile) {
			start, _, _ := strings.Cut(f[0], "-")
			addr, err := strconv.ParseUint(start, 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			if f[1] != "rw-p" {
				t.Fatalf("victim mapping %q: want rw-p", l)
			}
			return addr
		}
	}
	t.Fatalf("no mapping of %s in\n%s", victimFile, maps)
	return 0
}

// storeWithout returns a new store for images holding everything the dump
// holds but the page at addr of k.
func storeWithout(t *testing.T, old *Store, dumped map[Key]*imageSet, images string, k Key, addr uint64) *Store {
	t.Helper()
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	s := newTestStore(t, Config{Dir: images})
	for key, is := range dumped {
		if _, err := s.Open(key); err != nil {
			t.Fatal(err)
		}
		is.eachPage(func(va uint64, p page) {
			if key == k && va == addr {
				return
			}
			if err := s.Add(key, va, 1, p.flags, p.data); err != nil {
				t.Fatal(err)
			}
		})
	}
	return s
}

package lazy

import (
	"bytes"
	"context"
	"errors"
	"os"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/phaul/phaul/core/pagestore"
)

// TestRefill writes a task's lazy pages from its images into memory that
// has never been touched (as a held tree's is once its daemon is gone):
// this process plays the task. Pages outside the lazy ranges stay as they
// are; a lazy range the images hold no content for fails with ErrNoPage.
func TestRefill(t *testing.T) {
	const id = 7
	mem, err := unix.Mmap(-1, 0, 8*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	base := uint64(reflect.ValueOf(mem).Pointer())
	copy(mem[6*pageSize:], "eager")
	dir := t.TempDir()
	writeFile(t, dir, "pstree.img", pstreeImage(id))
	vmas := []testVMA{anonVMA(base, base+8*pageSize, unix.PROT_READ|unix.PROT_WRITE)}
	writeTaskImages(t, dir, id, []pagestore.Entry{
		{Vaddr: base, NrPages: 6, Flags: pagestore.FlagPresent | pagestore.FlagLazy},
		{Vaddr: base + 6*pageSize, NrPages: 2, Flags: pagestore.FlagPresent},
	}, vmas)
	n, err := Refill(context.Background(), dir, map[uint32]int{id: os.Getpid()})
	if err != nil || n != 6 {
		t.Fatalf("Refill = %d pages, %v; want 6", n, err)
	}
	want := make([]byte, 6*pageSize)
	fillPattern(id, base, want)
	if !bytes.Equal(mem[:6*pageSize], want) {
		t.Fatal("lazy pages after Refill differ from the images")
	}
	if string(mem[6*pageSize:6*pageSize+5]) != "eager" {
		t.Fatalf("a page outside the lazy ranges was written: %q", mem[6*pageSize:6*pageSize+5])
	}

	if _, err := Refill(context.Background(), dir, map[uint32]int{}); err == nil {
		t.Error("Refill without the task's process succeeded")
	}
	remote := t.TempDir() // post-copy: lazy without content here
	writeFile(t, remote, "pstree.img", pstreeImage(id))
	writeTaskImages(t, remote, id, []pagestore.Entry{{Vaddr: base, NrPages: 2, Flags: pagestore.FlagLazy}}, vmas)
	if _, err := Refill(context.Background(), remote, map[uint32]int{id: os.Getpid()}); !errors.Is(err, ErrNoPage) {
		t.Errorf("Refill of pages the images lack: %v, want ErrNoPage", err)
	}
}

package lazy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/phaul/phaul/core/pagestore"
)

func TestReadLazyVMAs(t *testing.T) {
	const rw = 3
	good := []testVMA{
		anonVMA(0x10000, 0x20000, rw),
		{start: 0x20000, end: 0x30000, prot: rw, flags: 0x01 | mapAnonymous, status: 1 | 1<<8}, // shared
		{start: 0x30000, end: 0x40000, prot: rw, flags: mapPrivate | mapAnonymous | mapLocked, status: 1 | 1<<9},
		{start: 0x40000, end: 0x42000, prot: 5, flags: mapPrivate | mapAnonymous, status: 1 | vmaAreaVDSO},
		{start: 0x50000, end: 0x60000, prot: 5, flags: mapPrivate, status: 1 | 1<<6}, // file private
		anonVMA(0x60000, 0x70000, 1),
		{start: 0xffffffffff600000, end: 0xffffffffff601000, prot: 5, flags: mapPrivate | mapAnonymous, status: 1 | vmaAreaVsyscall},
	}
	got, err := readLazyVMAs(bytes.NewReader(mmImage(good)))
	if want := []vma{{0x10000, 0x20000}, {0x60000, 0x70000}}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("lazy VMAs %v, %v; want %v", got, err, want)
	}
	bad := map[string][]testVMA{
		"unaligned":   {anonVMA(0x10001, 0x20000, rw)},
		"empty":       {anonVMA(0x20000, 0x20000, rw)},
		"overlapping": {anonVMA(0x10000, 0x30000, rw), anonVMA(0x20000, 0x40000, rw)},
		"unsorted":    {anonVMA(0x30000, 0x40000, rw), anonVMA(0x10000, 0x20000, rw)},
	}
	for name, vmas := range bad {
		if _, err := readLazyVMAs(bytes.NewReader(mmImage(vmas))); !errors.Is(err, ErrImage) {
			t.Errorf("%s: %v, want ErrImage", name, err)
		}
	}
	img := mmImage(good)
	for _, cut := range []int{0, 7, 12, len(img) - 1} {
		if _, err := readLazyVMAs(bytes.NewReader(img[:cut])); !errors.Is(err, ErrImage) {
			t.Errorf("cut at %d: %v, want ErrImage", cut, err)
		}
	}
}

func FuzzReadLazyVMAs(f *testing.F) {
	f.Add(mmImage([]testVMA{anonVMA(0x10000, 0x20000, 3), anonVMA(0x30000, 0x40000, 1)}))
	f.Add(mmImage(nil))
	f.Add([]byte{0x19, 0x43, 0x56, 0x54, 0x20, 0x28, 0x49, 0x57, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		vmas, err := readLazyVMAs(bytes.NewReader(in))
		if err != nil {
			return
		}
		for i, v := range vmas {
			if v.start >= v.end || v.start%pageSize != 0 || i > 0 && vmas[i-1].end > v.start {
				t.Fatalf("accepted bad VMAs %v", vmas)
			}
		}
	})
}

// TestLazyRanges: only PE_LAZY entries, only inside lazy VMAs, split at
// every VMA boundary.
func TestLazyRanges(t *testing.T) {
	m := &pagestore.Pagemap{Entries: []pagestore.Entry{
		{Vaddr: 0x0, NrPages: 4, Flags: pagestore.FlagLazy},                                // before any VMA
		{Vaddr: 0x10000, NrPages: 2, Flags: pagestore.FlagPresent},                         // not lazy
		{Vaddr: 0x12000, NrPages: 0x1e, Flags: pagestore.FlagLazy | pagestore.FlagPresent}, // spans two VMAs and a gap
		{Vaddr: 0x40000, NrPages: 1, Flags: pagestore.FlagLazy},
	}}
	vmas := []vma{{0x10000, 0x20000}, {0x20000, 0x28000}, {0x2a000, 0x50000}}
	got := lazyRanges(m, vmas)
	want := []seg{{0x12000, 0x20000, 0x12000}, {0x20000, 0x28000, 0x20000}, {0x2a000, 0x30000, 0x2a000}, {0x40000, 0x41000, 0x40000}}
	if !slices.Equal(got.runs, want) || got.pages != 0xe+8+6+1 {
		t.Fatalf("ranges %x (%d pages), want %x", got.runs, got.pages, want)
	}
}

// TestImageSource reads the pattern back from images written with it,
// across entries, and refuses pages without content.
func TestImageSource(t *testing.T) {
	dir := t.TempDir()
	const id = 7
	entries := []pagestore.Entry{
		{Vaddr: 0x10000, NrPages: 4, Flags: pagestore.FlagPresent},
		{Vaddr: 0x14000, NrPages: 4, Flags: pagestore.FlagPresent | pagestore.FlagLazy},
		{Vaddr: 0x18000, NrPages: 2, Flags: pagestore.FlagLazy}, // no content here
		{Vaddr: 0x20000, NrPages: 1, Flags: pagestore.FlagParent},
	}
	writeTaskImages(t, dir, id, entries, nil)
	src := NewImageSource(dir)
	defer src.Close()
	ctx := context.Background()
	buf, want := make([]byte, 6*pageSize), make([]byte, 6*pageSize)
	if err := src.ReadPages(ctx, id, 0x12000, buf); err != nil {
		t.Fatal(err)
	}
	fillPattern(id, 0x12000, want)
	if !bytes.Equal(buf, want) {
		t.Fatal("pages across two entries differ from the pattern")
	}
	for _, addr := range []uint64{0x17000, 0x18000, 0x20000, 0x30000, 0xf000} {
		if err := src.ReadPages(ctx, id, addr, buf[:2*pageSize]); !errors.Is(err, ErrNoPage) {
			t.Errorf("read at %#x: %v, want ErrNoPage", addr, err)
		}
	}
	if err := src.ReadPages(ctx, id+1, 0x10000, buf[:pageSize]); err == nil {
		t.Error("read of a task without images succeeded")
	}
	if err := src.ReadPages(ctx, id, 0x10001, buf[:pageSize]); err == nil {
		t.Error("unaligned read succeeded")
	}
}

func TestReadTaskCount(t *testing.T) {
	good := pstreeImage(1, 7, 9)
	if n, err := readTaskCount(bytes.NewReader(good)); err != nil || n != 3 {
		t.Fatalf("tasks %d, %v; want 3", n, err)
	}
	bad := map[string][]byte{
		"no task":   pstreeImage(),
		"pid 0":     pstreeImage(1, 0),
		"pid range": pstreeImage(maxPid + 1),
		"mm magic":  append(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, magicImgCommon), magicMM), good[8:]...),
		"huge":      binary.LittleEndian.AppendUint32(pstreeImage(1), maxPstreeBytes+1),
		"garbage":   append(binary.LittleEndian.AppendUint32(pstreeImage(1), 2), 0xff, 0xff),
	}
	for _, cut := range []int{0, 7, 10, len(good) - 1} {
		bad[fmt.Sprintf("cut at %d", cut)] = good[:cut]
	}
	for name, img := range bad {
		if _, err := readTaskCount(bytes.NewReader(img)); !errors.Is(err, ErrImage) {
			t.Errorf("%s: %v, want ErrImage", name, err)
		}
	}
}

func FuzzReadTaskCount(f *testing.F) {
	f.Add(pstreeImage(1, 7))
	f.Add(pstreeImage())
	f.Add(binary.LittleEndian.AppendUint32(pstreeImage(1), 0xffffffff))
	f.Fuzz(func(t *testing.T, in []byte) {
		n, err := readTaskCount(bytes.NewReader(in))
		if err == nil && (n < 1 || n > maxPid) {
			t.Fatalf("accepted %d tasks", n)
		}
	})
}

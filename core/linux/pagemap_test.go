package linux

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestHavePagemapScan(t *testing.T) {
	// PAGEMAP_SCAN came in 6.7: older kernels must say no; newer ones may
	// still lack it (an architecture without it, a seccomp filter).
	checkConclusive(t, "PAGEMAP_SCAN", HavePagemapScan(), olderThan(t, 6, 7))
}

func TestPagemapEntryAndScan(t *testing.T) {
	pageBytes := uint64(os.Getpagesize())
	pg, err := mapAnon(4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.unmap)
	pg.b[0] = 1
	pg.b[2*pageBytes] = 1
	pm, err := OpenPagemap(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.Close() })

	tests := []struct {
		page    uint64
		present bool
	}{{0, true}, {1, false}, {2, true}, {3, false}}
	for _, tt := range tests {
		e, err := pm.Entry(pg.addr + tt.page*pageBytes)
		if err != nil {
			t.Fatal(err)
		}
		if e.Present() != tt.present || e.Swapped() || e.FileOrShared() {
			t.Errorf("page %d: entry %#x, want present=%v anon", tt.page, uint64(e), tt.present)
		}
		if tt.present && !e.Exclusive() {
			t.Errorf("page %d: entry %#x, want exclusively mapped", tt.page, uint64(e))
		}
	}

	requireFeature(t, HavePagemapScan)
	scan := ScanArgs{Start: pg.addr, End: pg.addr + 4*pageBytes, Mask: PageIsPresent, Return: PageIsPresent}
	vec := make([]PageRegion, 4)
	n, walkEnd, err := pm.Scan(scan, vec)
	if err != nil {
		t.Fatal(err)
	}
	want := []PageRegion{
		{pg.addr, pg.addr + pageBytes, PageIsPresent},
		{pg.addr + 2*pageBytes, pg.addr + 3*pageBytes, PageIsPresent},
	}
	if n != len(want) || vec[0] != want[0] || vec[1] != want[1] || walkEnd != scan.End {
		t.Errorf("scan = %d %+v walkEnd %#x; want %+v walkEnd %#x", n, vec[:n], walkEnd, want, scan.End)
	}
	// A full vector stops the walk at the next region.
	n, walkEnd, err = pm.Scan(scan, vec[:1])
	if err != nil || n != 1 || walkEnd != want[1].Start {
		t.Errorf("scan with 1 slot = %d, walkEnd %#x, %v; want 1, %#x", n, walkEnd, err, want[1].Start)
	}
	if err := pm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := pm.Scan(scan, vec); !errors.Is(err, os.ErrClosed) {
		t.Errorf("scan after Close: %v, want os.ErrClosed", err)
	}
}

func TestZeroPagePFN(t *testing.T) {
	pfn, err := ZeroPagePFN()
	if err != nil {
		t.Fatal(err)
	}
	if pfn == 0 {
		t.Skip("SKIP: frame numbers hidden from this process (no CAP_SYS_ADMIN)")
	}
	// A page written is not the zero page.
	pg, err := mapAnon(1)
	if err != nil {
		t.Fatal(err)
	}
	defer pg.unmap()
	pg.b[0] = 1
	pm, err := OpenPagemap(0)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	e, err := pm.Entry(pg.addr)
	if err != nil {
		t.Fatal(err)
	}
	if e.PFN() == pfn {
		t.Fatalf("a written page has the zero page's frame %#x", pfn)
	}
}

// TestPagemapGuard: a guard region's page reads as swapped with bit 58,
// and holds no data.
func TestPagemapGuard(t *testing.T) {
	if olderThan(t, 6, 15) {
		t.Skip("SKIP: pagemap reports guard regions from Linux 6.15")
	}
	pageBytes := uint64(os.Getpagesize())
	pg, err := mapAnon(2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.unmap)
	pg.b[0], pg.b[pageBytes] = 1, 1
	if err := unix.Madvise(pg.b[pageBytes:], unix.MADV_GUARD_INSTALL); err != nil {
		t.Fatalf("madvise MADV_GUARD_INSTALL: %v", err)
	}
	pm, err := OpenPagemap(0)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	ents := make([]PagemapEntry, 2)
	if err := pm.Entries(pg.addr, ents); err != nil {
		t.Fatal(err)
	}
	if ents[0].Guard() || !ents[0].Present() {
		t.Errorf("written page: entry %#x, want present, no guard", uint64(ents[0]))
	}
	if !ents[1].Guard() || ents[1].Present() {
		t.Errorf("guard page: entry %#x, want guard, not present", uint64(ents[1]))
	}
}

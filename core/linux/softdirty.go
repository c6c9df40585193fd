package linux

import (
	"errors"
	"fmt"
)

// HaveSoftDirty reports whether the kernel tracks soft-dirty ptes
// (CONFIG_MEM_SOFT_DIRTY, Linux 3.11; x86_64, ppc64, s390, riscv, not arm64).
// CRIU's iterative pre-dump (--track-mem) depends on it.
//
// The probe writes a fresh anonymous page and reads its /proc/self/pagemap
// entry: with soft-dirty the new page has bit 55 set (the VMA is new and the
// pte dirty). Without it the bit is always clear, and a write of "4" to
// clear_refs still succeeds, so that write proves nothing. Where PAGEMAP_SCAN
// exists the probe also asks it for PAGE_IS_SOFT_DIRTY pages as a second
// witness.
var HaveSoftDirty = newProbe("soft-dirty", "3.11", probeSoftDirty)

func probeSoftDirty() error {
	pg, err := mapAnon(1)
	if err != nil {
		return err
	}
	defer pg.unmap()
	pg.b[0] = 1
	pm, err := OpenPagemap(0)
	if err != nil {
		return err
	}
	defer pm.Close()
	e, err := pm.Entry(pg.addr)
	if err != nil {
		return err
	}
	if !e.Present() {
		// Reclaimed between write and read: no evidence either way.
		return fmt.Errorf("soft-dirty: written page not present (entry %#x)", uint64(e))
	}
	if e.SoftDirty() {
		return nil
	}
	reason := "CONFIG_MEM_SOFT_DIRTY off: pagemap bit 55 stays clear after a write"
	switch err := HavePagemapScan(); {
	case err == nil:
		var vec [1]PageRegion
		n, _, err := pm.Scan(ScanArgs{
			Start: pg.addr, End: pg.addr + uint64(len(pg.b)),
			Mask: PageIsSoftDirty, Return: PageIsSoftDirty,
		}, vec[:])
		if err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("soft-dirty: pagemap bit 55 clear but PAGEMAP_SCAN reports %+v", vec[0])
		}
		reason += " and PAGEMAP_SCAN finds no PAGE_IS_SOFT_DIRTY page"
	case !errors.Is(err, ErrNotSupported):
		return err
	}
	return fmt.Errorf("%w: %s", ErrNotSupported, reason)
}

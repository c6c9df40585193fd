package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pmScanArg is struct pm_scan_arg (include/uapi/linux/fs.h, 6.7); 96 B.
type pmScanArg struct {
	Size, Flags, Start, End, WalkEnd, Vec, VecLen, MaxPages       uint64
	CategoryInverted, CategoryMask, CategoryAnyofMask, ReturnMask uint64
}

// PageRegion is struct page_region (24 B): pages [Start, End) that share
// Categories (masked by ScanArgs.Return).
type PageRegion struct {
	Start, End uint64
	Categories PageCategory
}

// PageCategory is a set of PAGE_IS_* bits of PAGEMAP_SCAN.
type PageCategory uint64

// Page categories (include/uapi/linux/fs.h).
const (
	PageIsWPAllowed PageCategory = 1 << 0 // VMA registered for async uffd-wp
	PageIsWritten   PageCategory = 1 << 1 // not uffd write-protected
	PageIsFile      PageCategory = 1 << 2
	PageIsPresent   PageCategory = 1 << 3
	PageIsSwapped   PageCategory = 1 << 4
	PageIsPFNZero   PageCategory = 1 << 5
	PageIsHuge      PageCategory = 1 << 6
	PageIsSoftDirty PageCategory = 1 << 7 // always clear without CONFIG_MEM_SOFT_DIRTY
)

// ScanFlags are the PM_SCAN_* flags of PAGEMAP_SCAN.
type ScanFlags uint64

const (
	// ScanWPMatching write-protects the matching pages it reports; VMAs
	// without async uffd-wp are skipped silently.
	ScanWPMatching ScanFlags = 1 << 0
	// ScanCheckWPAsync makes such VMAs an EPERM instead.
	ScanCheckWPAsync ScanFlags = 1 << 1
)

const ioctlPagemapScan = 0xC0606610 // _IOWR('f', 16, struct pm_scan_arg)

// ScanArgs selects pages for Pagemap.Scan. A page matches when
// (c^Inverted)&Mask == Mask and, if AnyOf != 0, (c^Inverted)&AnyOf != 0.
// Start is rounded down and End up to pages; MaxPages 0 means no limit.
type ScanArgs struct {
	Flags                 ScanFlags
	Start, End            uint64
	MaxPages              uint64
	Inverted, Mask, AnyOf PageCategory
	Return                PageCategory // categories reported in PageRegion
}

// PagemapEntry is one 64-bit entry of /proc/PID/pagemap.
type PagemapEntry uint64

// Present reports bit 63: the page is in RAM.
func (e PagemapEntry) Present() bool { return e&(1<<63) != 0 }

// Swapped reports bit 62.
func (e PagemapEntry) Swapped() bool { return e&(1<<62) != 0 }

// FileOrShared reports bit 61: a file page or shared anon.
func (e PagemapEntry) FileOrShared() bool { return e&(1<<61) != 0 }

// Guard reports bit 58 (6.14): a guard region's page (MADV_GUARD_INSTALL,
// 6.13), which faults on any access. The kernel reports it as a swap
// entry too (Swapped), but it holds no data.
func (e PagemapEntry) Guard() bool { return e&(1<<58) != 0 }

// UffdWP reports bit 57 (5.13): the pte is uffd write-protected.
func (e PagemapEntry) UffdWP() bool { return e&(1<<57) != 0 }

// UffdWPMarker reports a pte marker that userfaultfd write protection
// left on a never-populated page (WP_UNPOPULATED, which WP_ASYNC implies):
// the kernel reports it as a swap entry (bit 62) with bit 57, of swap type
// 31 (SWP_PTE_MARKER, the last of the 5-bit types; no swap area has it).
// The page holds no data of its own: zeros, or its file's content. The
// type is in the frame-number bits, hidden without CAP_SYS_ADMIN: then it
// reports false.
func (e PagemapEntry) UffdWPMarker() bool {
	return e.Swapped() && !e.Present() && e.UffdWP() && e.PFN()&(1<<swapTypeBits-1) == swpPTEMarker
}

// The swap type in a swapped entry's frame bits: 5 bits (MAX_SWAPFILES_SHIFT);
// the kernel's pte-marker type is the highest.
const (
	swapTypeBits = 5
	swpPTEMarker = 1<<swapTypeBits - 1
)

// Exclusive reports bit 56 (4.2): the page is mapped exclusively.
func (e PagemapEntry) Exclusive() bool { return e&(1<<56) != 0 }

// SoftDirty reports bit 55; always clear without CONFIG_MEM_SOFT_DIRTY.
func (e PagemapEntry) SoftDirty() bool { return e&(1<<55) != 0 }

// Pagemap owns an open /proc/PID/pagemap. Opening another process's needs
// ptrace-read access to it. Safe for concurrent use; Close must not race.
type Pagemap struct{ f *os.File }

// OpenPagemap opens /proc/PID/pagemap; pid 0 means the calling process.
func OpenPagemap(pid int) (*Pagemap, error) {
	who := "self"
	if pid != 0 {
		who = strconv.Itoa(pid)
	}
	f, err := os.Open("/proc/" + who + "/pagemap")
	if err != nil {
		return nil, fmt.Errorf("open pagemap: %w", err)
	}
	return &Pagemap{f: f}, nil
}

// Close closes the file; later calls return nil.
func (p *Pagemap) Close() error {
	if p.f == nil {
		return nil
	}
	f := p.f
	p.f = nil
	return f.Close()
}

// Entry returns the pagemap entry of the page holding vaddr.
func (p *Pagemap) Entry(vaddr uint64) (PagemapEntry, error) {
	if p.f == nil {
		return 0, os.ErrClosed
	}
	var b [8]byte
	off := int64(vaddr / uint64(os.Getpagesize()) * 8)
	if _, err := p.f.ReadAt(b[:], off); err != nil {
		return 0, fmt.Errorf("read pagemap %#x: %w", vaddr, err)
	}
	return PagemapEntry(binary.NativeEndian.Uint64(b[:])), nil // kernel memory layout, not wire
}

// Scan runs PAGEMAP_SCAN (Linux 6.7) and fills vec with matching regions.
// It returns the number of regions written and walkEnd, the address where
// the walk stopped: a.End when complete, else the point to resume from
// (vec full or MaxPages reached).
func (p *Pagemap) Scan(a ScanArgs, vec []PageRegion) (n int, walkEnd uint64, err error) {
	arg := pmScanArg{
		Size: uint64(unsafe.Sizeof(pmScanArg{})), Flags: uint64(a.Flags),
		Start: a.Start, End: a.End, VecLen: uint64(len(vec)), MaxPages: a.MaxPages,
		CategoryInverted: uint64(a.Inverted), CategoryMask: uint64(a.Mask),
		CategoryAnyofMask: uint64(a.AnyOf), ReturnMask: uint64(a.Return),
	}
	if len(vec) > 0 {
		arg.Vec = uint64(uintptr(unsafe.Pointer(&vec[0])))
	}
	n, err = ioctlPtr(p.f, ioctlPagemapScan, unsafe.Pointer(&arg))
	runtime.KeepAlive(vec)
	if err != nil {
		return 0, arg.WalkEnd, fmt.Errorf("PAGEMAP_SCAN %#x-%#x: %w", a.Start, a.End, err)
	}
	return n, arg.WalkEnd, nil
}

// HavePagemapScan reports whether the PAGEMAP_SCAN ioctl works (Linux 6.7).
var HavePagemapScan = newProbe("PAGEMAP_SCAN", "6.7", probePagemapScan)

func probePagemapScan() error {
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
	var vec [1]PageRegion
	n, _, err := pm.Scan(ScanArgs{
		Start: pg.addr, End: pg.addr + uint64(len(pg.b)),
		Mask: PageIsPresent, Return: PageIsPresent,
	}, vec[:])
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("%w: %w", ErrNotSupported, err)
	}
	if err != nil {
		return err
	}
	if n != 1 || vec[0].Start != pg.addr {
		return fmt.Errorf("PAGEMAP_SCAN: a written page gave %d regions %+v", n, vec[0])
	}
	return nil
}

// anonPages is a private anonymous mapping made for a probe.
type anonPages struct {
	b    []byte
	addr uint64
}

func mapAnon(nrPages int) (*anonPages, error) {
	b, err := unix.Mmap(-1, 0, nrPages*os.Getpagesize(),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("mmap: %w", err)
	}
	return &anonPages{b: b, addr: uint64(uintptr(unsafe.Pointer(&b[0])))}, nil
}

func (p *anonPages) unmap() { _ = unix.Munmap(p.b) }

// Entries fills out with the pagemap entries of the len(out) pages from
// vaddr (page aligned).
func (p *Pagemap) Entries(vaddr uint64, out []PagemapEntry) error {
	if p.f == nil {
		return os.ErrClosed
	}
	if len(out) == 0 {
		return nil
	}
	b := unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), len(out)*8) // kernel layout: native u64s
	off := int64(vaddr / uint64(os.Getpagesize()) * 8)
	if _, err := p.f.ReadAt(b, off); err != nil {
		return fmt.Errorf("read pagemap %#x+%d: %w", vaddr, len(out), err)
	}
	return nil
}

// PFN returns the page frame number of a present page (bits 0-54). Only
// a process with CAP_SYS_ADMIN sees it; others read 0.
func (e PagemapEntry) PFN() uint64 { return uint64(e) & (1<<55 - 1) }

// ZeroPagePFN returns the frame number of the kernel's shared zero page,
// which a read of never-written anonymous memory maps (CRIU dumps no such
// page). It is 0 when this process cannot see frame numbers.
var ZeroPagePFN = newValueProbe("zero page pfn", "2.6.25", probeZeroPagePFN)

// zeroSink keeps the probe's read from being optimised away.
var zeroSink byte

func probeZeroPagePFN() (uint64, error) {
	pg, err := mapAnon(1)
	if err != nil {
		return 0, err
	}
	defer pg.unmap()
	zeroSink += pg.b[0] // a read fault maps the zero page
	pm, err := OpenPagemap(0)
	if err != nil {
		return 0, err
	}
	defer pm.Close()
	e, err := pm.Entry(pg.addr)
	if err != nil {
		return 0, err
	}
	if !e.Present() {
		return 0, fmt.Errorf("zero page pfn: a read page is not present (entry %#x)", uint64(e))
	}
	return e.PFN(), nil
}

package linux

import (
	"errors"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestUffdLayouts(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"uffdio_api", unsafe.Sizeof(uffdioAPI{}), 24},
		{"uffdio_range", unsafe.Sizeof(UffdRange{}), 16},
		{"uffdio_register", unsafe.Sizeof(uffdioRegister{}), 32},
		{"uffdio_copy", unsafe.Sizeof(uffdioCopy{}), 40},
		{"uffdio_zeropage", unsafe.Sizeof(uffdioZeropage{}), 32},
		{"uffdio_writeprotect", unsafe.Sizeof(uffdioWriteprotect{}), 24},
		{"uffd_msg", unsafe.Sizeof(uffdMsg{}), 32},
		{"pm_scan_arg", unsafe.Sizeof(pmScanArg{}), 96},
		{"page_region", unsafe.Sizeof(PageRegion{}), 24},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("sizeof(struct %s) = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
	// _IOWR(type, nr, size) carries the struct size in bits 16-29.
	ioctls := []struct {
		name string
		nr   uint
		size uintptr
	}{
		{"UFFDIO_API", ioctlUffdioAPI, unsafe.Sizeof(uffdioAPI{})},
		{"UFFDIO_REGISTER", ioctlUffdioRegister, unsafe.Sizeof(uffdioRegister{})},
		{"UFFDIO_UNREGISTER", ioctlUffdioUnregister, unsafe.Sizeof(UffdRange{})},
		{"UFFDIO_COPY", ioctlUffdioCopy, unsafe.Sizeof(uffdioCopy{})},
		{"UFFDIO_ZEROPAGE", ioctlUffdioZeropage, unsafe.Sizeof(uffdioZeropage{})},
		{"UFFDIO_WRITEPROTECT", ioctlUffdioWriteprotect, unsafe.Sizeof(uffdioWriteprotect{})},
		{"PAGEMAP_SCAN", ioctlPagemapScan, unsafe.Sizeof(pmScanArg{})},
	}
	for _, io := range ioctls {
		if got := uintptr(io.nr>>16) & 0x3fff; got != io.size {
			t.Errorf("%s %#x encodes size %d, struct is %d", io.name, io.nr, got, io.size)
		}
	}
}

func TestUffdFeatureNames(t *testing.T) {
	tests := []struct {
		in   UffdFeature
		want string
	}{
		{0, "0"},
		{UffdFeatureWPAsync, "WP_ASYNC"},
		{UffdFeatureEvents, "EVENT_FORK|EVENT_REMAP|EVENT_REMOVE|EVENT_UNMAP"},
		{UffdFeatureMissingShmem | UffdFeatureMinorShmem, "MISSING_SHMEM|MINOR_SHMEM"},
		{UffdFeatureMove | 1<<20, "MOVE|bit20"},
	}
	for _, tt := range tests {
		if got := tt.in.String(); got != tt.want {
			t.Errorf("UffdFeature(%#x).String() = %q, want %q", uint64(tt.in), got, tt.want)
		}
	}
	if n := len(uffdFeatureKnown.Names()); n != len(uffdFeatureNames) {
		t.Errorf("uffdFeatureKnown has %d bits, %d names", n, len(uffdFeatureNames))
	}
}

// TestUffdFeaturesOnThisKernel: the feature probes agree with the features
// UFFDIO_API offers, and what the kernel's version or build rules out is
// reported missing. Offered features are exercised by the tests that use
// them (TestUffdWPAsyncTracksOwnWrites); a version or a config never makes
// one expected (seccomp, vm.unprivileged_userfaultfd, architectures).
func TestUffdFeaturesOnThisKernel(t *testing.T) {
	have, err := UffdFeatures()
	if notBuilt(t, "CONFIG_USERFAULTFD") {
		checkConclusive(t, "userfaultfd", err, true)
		return
	}
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("SKIP: userfaultfd unavailable to this process: %v", err)
	}
	if err != nil {
		t.Fatalf("UffdFeatures: %v", err)
	}
	t.Logf("userfaultfd features %#x: %v", uint64(have), have)
	if have&^uffdFeatureKnown != 0 {
		t.Logf("kernel offers bits this package does not name: %v", have&^uffdFeatureKnown)
	}
	for _, f := range []UffdFeature{UffdFeatureWPAsync, UffdFeatureWPUnpopulated, UffdFeatureEvents, UffdFeatureMinorShmem} {
		if err := HaveUffdFeatures(f); (err == nil) != have.Has(f) || (err != nil && !errors.Is(err, ErrNotSupported)) {
			t.Errorf("HaveUffdFeatures(%v) = %v, but UFFDIO_API offers %v", f, err, have)
		}
	}
	if (HaveUffdWPAsync() == nil) != have.Has(UffdFeatureWPAsync) {
		t.Errorf("HaveUffdWPAsync() = %v, UFFDIO_API offers %v", HaveUffdWPAsync(), have)
	}
	checkConclusive(t, "bit 40", HaveUffdFeatures(1<<40), true)
	if olderThan(t, 6, 7) && have.Has(UffdFeatureWPAsync) {
		t.Errorf("WP_ASYNC offered by a kernel older than 6.7: %v", have)
	}
	if notBuilt(t, "CONFIG_HAVE_ARCH_USERFAULTFD_MINOR") && have.Has(UffdFeatureMinorShmem) {
		t.Errorf("no CONFIG_HAVE_ARCH_USERFAULTFD_MINOR, yet MINOR_SHMEM in %v", have)
	}
}

// TestUffdWPAsyncTracksOwnWrites runs phaul's dirty-tracking recipe on a
// mapping of this process: protect, write one page, scan.
func TestUffdWPAsyncTracksOwnWrites(t *testing.T) {
	requireFeature(t, HaveUffdWPAsync)
	requireFeature(t, HavePagemapScan)
	const nrPages = 8
	pg, err := mapAnon(nrPages)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.unmap)
	pageBytes := uint64(os.Getpagesize())
	r := UffdRange{Start: pg.addr, Len: nrPages * pageBytes}

	u, err := OpenUffd()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	if _, err := u.API(UffdFeatureWPAsync); err != nil {
		t.Fatal(err)
	}
	if _, err := u.API(UffdFeatureWPAsync); !errors.Is(err, unix.EINVAL) {
		t.Errorf("second UFFDIO_API: %v, want EINVAL", err)
	}
	if err := u.Register(r, UffdRegisterWP); err != nil {
		t.Fatal(err)
	}
	if err := u.WriteProtect(r, true); err != nil {
		t.Fatal(err)
	}
	pm, err := OpenPagemap(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.Close() })
	scan := ScanArgs{
		Flags: ScanWPMatching | ScanCheckWPAsync,
		Start: r.Start, End: r.Start + r.Len,
		Mask: PageIsWritten, Return: PageIsWritten,
	}
	vec := make([]PageRegion, nrPages)
	written := func() []PageRegion {
		t.Helper()
		n, walkEnd, err := pm.Scan(scan, vec)
		if err != nil {
			t.Fatal(err)
		}
		if walkEnd != scan.End {
			t.Errorf("walk ended at %#x, want %#x", walkEnd, scan.End)
		}
		return vec[:n]
	}
	if got := written(); len(got) != 0 {
		t.Fatalf("after protect: written %+v, want none", got)
	}
	pg.b[3*pageBytes] = 1
	pg.b[3*pageBytes+100] = 2
	want := PageRegion{Start: pg.addr + 3*pageBytes, End: pg.addr + 4*pageBytes, Categories: PageIsWritten}
	if got := written(); len(got) != 1 || got[0] != want {
		t.Fatalf("after one write: written %+v, want [%+v]", got, want)
	}
	if e, err := pm.Entry(want.Start); err != nil || !e.UffdWP() {
		t.Errorf("page after scan: entry %#x, %v; want uffd-wp bit 57", uint64(e), err)
	}
	if got := written(); len(got) != 0 {
		t.Fatalf("scan re-protects: written %+v, want none", got)
	}
	if err := u.Unregister(r); err != nil {
		t.Fatal(err)
	}
	if _, _, err := pm.Scan(scan, vec); !errors.Is(err, unix.EPERM) {
		t.Errorf("scan after unregister: %v, want EPERM", err)
	}
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if err := u.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestUffdCopyZeropage(t *testing.T) {
	requireFeature(t, HaveUserfaultfd)
	pageBytes := os.Getpagesize()
	pg, err := mapAnon(2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.unmap)
	u, err := OpenUffd()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	if _, err := u.API(0); err != nil {
		t.Fatal(err)
	}
	r := UffdRange{Start: pg.addr, Len: uint64(2 * pageBytes)}
	if err := u.Register(r, UffdRegisterMissing); err != nil {
		t.Fatal(err)
	}
	src := make([]byte, pageBytes)
	src[7] = 0x5a
	if n, err := u.Copy(pg.addr, src); err != nil || n != pageBytes {
		t.Fatalf("Copy = %d, %v", n, err)
	}
	if _, err := u.Copy(pg.addr, src); !errors.Is(err, unix.EEXIST) {
		t.Errorf("second Copy: %v, want EEXIST", err)
	}
	second := UffdRange{Start: pg.addr + uint64(pageBytes), Len: uint64(pageBytes)}
	if n, err := u.Zeropage(second); err != nil || n != pageBytes {
		t.Fatalf("Zeropage = %d, %v", n, err)
	}
	// Both pages are mapped now, so reading them cannot fault.
	if pg.b[7] != 0x5a || pg.b[pageBytes+7] != 0 {
		t.Errorf("pages hold %#x %#x", pg.b[7], pg.b[pageBytes+7])
	}
	if err := u.Unregister(r); err != nil {
		t.Fatal(err)
	}
}

// requireFeature is testenv.RequireKernelFeature, which core cannot import.
func requireFeature(t *testing.T, probe func() error) {
	t.Helper()
	switch err := probe(); {
	case err == nil:
	case errors.Is(err, ErrNotSupported):
		t.Skipf("SKIP: kernel lacks it: %v", err)
	default:
		t.Fatalf("feature probe failed: %v", err)
	}
}

// TestUffdWPMarker: write protection leaves markers on never-populated
// pages, which pagemap reports as swapped; UffdWPMarker tells them from
// pages with data.
func TestUffdWPMarker(t *testing.T) {
	requireFeature(t, HaveUffdWPAsync)
	if pfn, err := ZeroPagePFN(); err != nil || pfn == 0 {
		t.Skipf("SKIP: frame numbers hidden from this process (no CAP_SYS_ADMIN): %v", err)
	}
	const nrPages = 4
	pg, err := mapAnon(nrPages)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.unmap)
	pg.b[0] = 1 // populated before the protection
	r := UffdRange{Start: pg.addr, Len: nrPages * uint64(os.Getpagesize())}
	u, err := OpenUffd()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	if _, err := u.API(UffdFeatureWPAsync); err != nil {
		t.Fatal(err)
	}
	if err := u.Register(r, UffdRegisterWP); err != nil {
		t.Fatal(err)
	}
	if err := u.WriteProtect(r, true); err != nil {
		t.Fatal(err)
	}
	pg.b[2*os.Getpagesize()] = 1 // populated under protection (WP_ASYNC resolves it)
	pm, err := OpenPagemap(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.Close() })
	ents := make([]PagemapEntry, nrPages)
	if err := pm.Entries(pg.addr, ents); err != nil {
		t.Fatal(err)
	}
	for i, want := range []bool{false, true, false, true} {
		if got := ents[i].UffdWPMarker(); got != want {
			t.Errorf("page %d: entry %#x, marker %v, want %v", i, uint64(ents[i]), got, want)
		}
	}
	if err := u.Close(); err != nil { // unregisters: the markers go
		t.Fatal(err)
	}
	if err := pm.Entries(pg.addr, ents); err != nil {
		t.Fatal(err)
	}
	for i, e := range ents {
		if e.UffdWPMarker() {
			t.Errorf("page %d after close: entry %#x still a marker", i, uint64(e))
		}
	}
}

package linux

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mirrors of include/uapi/linux/userfaultfd.h; uffd_test.go pins the sizes.
type (
	uffdioAPI struct{ API, Features, Ioctls uint64 } // 24 B

	// UffdRange is struct uffdio_range: Len bytes from Start, both
	// page-aligned, addresses in the mm the userfaultfd belongs to.
	UffdRange struct{ Start, Len uint64 } // 16 B

	uffdioRegister struct { // 32 B
		Range  UffdRange
		Mode   uint64
		Ioctls uint64
	}
	uffdioCopy struct { // 40 B
		Dst, Src, Len, Mode uint64
		Copy                int64
	}
	uffdioZeropage struct { // 32 B
		Range    UffdRange
		Mode     uint64
		Zeropage int64
	}
	uffdioWriteprotect struct { // 24 B
		Range UffdRange
		Mode  uint64
	}
	// uffdMsg is struct uffd_msg (packed); Arg is the event's union.
	uffdMsg struct { // 32 B
		Event uint8
		_     [7]byte
		Arg   [24]byte
	}
)

// UffdRegisterMode selects what UFFDIO_REGISTER tracks on a range.
type UffdRegisterMode uint64

// Register modes (UFFDIO_REGISTER_MODE_*).
const (
	UffdRegisterMissing UffdRegisterMode = 1 << 0
	UffdRegisterWP      UffdRegisterMode = 1 << 1
	UffdRegisterMinor   UffdRegisterMode = 1 << 2
)

const (
	uffdAPI          = 0xAA
	uffdUserModeOnly = 1 // UFFD_USER_MODE_ONLY (5.11): only user-space faults

	// ioctl numbers on linux/amd64.
	ioctlUffdioAPI          = 0xC018AA3F
	ioctlUffdioRegister     = 0xC020AA00
	ioctlUffdioUnregister   = 0x8010AA01
	ioctlUffdioCopy         = 0xC028AA03
	ioctlUffdioZeropage     = 0xC020AA04
	ioctlUffdioWriteprotect = 0xC018AA06

	uffdioWriteprotectModeWP = 1 << 0
)

// Uffd owns one userfaultfd until Close. The fd is O_NONBLOCK and joins the
// Go poller, so Close unblocks a reader of File. Methods are safe for
// concurrent use (the kernel serialises them); Close must not race them.
type Uffd struct{ f *os.File }

// OpenUffd creates a userfaultfd bound to the calling process's mm, with
// O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY (the last only where the kernel
// knows it, 5.11+). Call API before any other method.
func OpenUffd() (*Uffd, error) {
	fd, err := userfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK | uffdUserModeOnly)
	if errors.Is(err, unix.EINVAL) {
		fd, err = userfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK) // before 5.11
	}
	if err != nil {
		return nil, fmt.Errorf("userfaultfd: %w", err)
	}
	return &Uffd{f: os.NewFile(uintptr(fd), "userfaultfd")}, nil
}

// NewUffd takes ownership of f, a userfaultfd obtained elsewhere (from
// Pidfd.Getfd or over a unix socket). f must not be used afterwards.
func NewUffd(f *os.File) *Uffd { return &Uffd{f: f} }

func userfaultfd(flags int) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// File returns the underlying file for reading uffd_msg events. It stays
// owned by u.
func (u *Uffd) File() *os.File { return u.f }

// Close closes the userfaultfd; later calls return nil.
func (u *Uffd) Close() error {
	if u.f == nil {
		return nil
	}
	f := u.f
	u.f = nil
	return f.Close()
}

// API enables the features in want (UFFDIO_API) and returns every feature
// the kernel offers. The kernel accepts it once per fd: a second call fails
// with EINVAL. WP_ASYNC implies WP_UNPOPULATED. EVENT_FORK needs
// CAP_SYS_PTRACE (EPERM otherwise).
func (u *Uffd) API(want UffdFeature) (UffdFeature, error) {
	arg := uffdioAPI{API: uffdAPI, Features: uint64(want)}
	if _, err := ioctlPtr(u.f, ioctlUffdioAPI, unsafe.Pointer(&arg)); err != nil {
		return 0, fmt.Errorf("UFFDIO_API %v: %w", want, err)
	}
	return UffdFeature(arg.Features), nil
}

// Register starts tracking r in the given modes (UFFDIO_REGISTER).
func (u *Uffd) Register(r UffdRange, mode UffdRegisterMode) error {
	arg := uffdioRegister{Range: r, Mode: uint64(mode)}
	if _, err := ioctlPtr(u.f, ioctlUffdioRegister, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("UFFDIO_REGISTER %#x+%#x mode %d: %w", r.Start, r.Len, mode, err)
	}
	return nil
}

// Unregister stops tracking r (UFFDIO_UNREGISTER) and drops its
// write-protection.
func (u *Uffd) Unregister(r UffdRange) error {
	if _, err := ioctlPtr(u.f, ioctlUffdioUnregister, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER %#x+%#x: %w", r.Start, r.Len, err)
	}
	return nil
}

// WriteProtect sets (protect) or clears write-protection on r, which must be
// registered with UffdRegisterWP (UFFDIO_WRITEPROTECT).
func (u *Uffd) WriteProtect(r UffdRange, protect bool) error {
	arg := uffdioWriteprotect{Range: r}
	if protect {
		arg.Mode = uffdioWriteprotectModeWP
	}
	if _, err := ioctlPtr(u.f, ioctlUffdioWriteprotect, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("UFFDIO_WRITEPROTECT %#x+%#x: %w", r.Start, r.Len, err)
	}
	return nil
}

// Copy fills the missing pages at dst with src (UFFDIO_COPY) and wakes the
// faulting threads. len(src) must be a multiple of the page size. It returns
// the bytes copied, which are fewer than len(src) when err is EAGAIN
// (the mm changed; retry the rest). EEXIST means dst is already mapped.
func (u *Uffd) Copy(dst uint64, src []byte) (int, error) {
	if len(src) == 0 {
		return 0, nil
	}
	arg := uffdioCopy{Dst: dst, Src: uint64(uintptr(unsafe.Pointer(&src[0]))), Len: uint64(len(src))}
	_, err := ioctlPtr(u.f, ioctlUffdioCopy, unsafe.Pointer(&arg))
	runtime.KeepAlive(src)
	n := max(arg.Copy, 0)
	if err != nil {
		return int(n), fmt.Errorf("UFFDIO_COPY %#x+%#x: %w", dst, len(src), err)
	}
	return int(n), nil
}

// Zeropage maps zero pages over the missing pages of r (UFFDIO_ZEROPAGE)
// and returns the bytes mapped; errors as for Copy.
func (u *Uffd) Zeropage(r UffdRange) (int, error) {
	arg := uffdioZeropage{Range: r}
	_, err := ioctlPtr(u.f, ioctlUffdioZeropage, unsafe.Pointer(&arg))
	n := max(arg.Zeropage, 0)
	if err != nil {
		return int(n), fmt.Errorf("UFFDIO_ZEROPAGE %#x+%#x: %w", r.Start, r.Len, err)
	}
	return int(n), nil
}

// ioctlPtr issues ioctl(f, req, arg) and returns its non-negative result.
func ioctlPtr(f *os.File, req uint, arg unsafe.Pointer) (int, error) {
	if f == nil {
		return 0, os.ErrClosed
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		r1    uintptr
		errno unix.Errno
	)
	if cerr := rc.Control(func(fd uintptr) {
		r1, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(arg))
	}); cerr != nil {
		return 0, cerr
	}
	if errno != 0 {
		return 0, errno
	}
	return int(r1), nil
}

// UffdFeatures returns every userfaultfd feature the kernel offers, measured
// once with UFFDIO_API on a throwaway fd (as CRIU's kerndat does). Requesting
// EVENT_FORK additionally needs CAP_SYS_PTRACE. The error wraps
// ErrNotSupported when userfaultfd is missing or blocked for this process.
func UffdFeatures() (UffdFeature, error) { return uffdFeatures() }

var uffdFeatures = newValueProbe("userfaultfd", "4.3", probeUffdFeatures)

func probeUffdFeatures() (UffdFeature, error) {
	u, err := OpenUffd()
	switch {
	case errors.Is(err, unix.ENOSYS):
		return 0, fmt.Errorf("%w: CONFIG_USERFAULTFD off: %w", ErrNotSupported, err)
	case errors.Is(err, unix.EPERM):
		return 0, fmt.Errorf("%w: blocked for this process (seccomp, or vm.unprivileged_userfaultfd=0 before 5.11): %w", ErrNotSupported, err)
	case err != nil:
		return 0, err
	}
	defer u.Close()
	return u.API(0)
}

// HaveUserfaultfd reports whether this process can use userfaultfd(2).
func HaveUserfaultfd() error {
	_, err := uffdFeatures()
	return err
}

// HaveUffdFeatures reports whether the kernel offers every feature in want;
// the error wraps ErrNotSupported and names the missing bits.
func HaveUffdFeatures(want UffdFeature) error {
	have, err := uffdFeatures()
	if err != nil {
		return err
	}
	if missing := want &^ have; missing != 0 {
		return fmt.Errorf("userfaultfd feature %v: %w (kernel offers %v)", missing, ErrNotSupported, have)
	}
	return nil
}

// HaveUffdWPAsync reports whether UFFD_FEATURE_WP_ASYNC (Linux 6.7) is
// offered: write faults on write-protected pages are resolved in the kernel
// and PAGEMAP_SCAN reads and re-arms the protection, phaul's dirty tracker.
func HaveUffdWPAsync() error { return HaveUffdFeatures(UffdFeatureWPAsync) }

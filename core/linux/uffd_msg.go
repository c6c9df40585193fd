package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// UffdEventKind is the event byte of struct uffd_msg.
type UffdEventKind uint8

// Events a userfaultfd reports (UFFD_EVENT_*). All but PAGEFAULT need the
// matching UffdFeatureEvent* bit (non-cooperative userfaultfd, 4.11+).
const (
	UffdEventPagefault UffdEventKind = 0x12
	UffdEventFork      UffdEventKind = 0x13
	UffdEventRemap     UffdEventKind = 0x14
	UffdEventRemove    UffdEventKind = 0x15
	UffdEventUnmap     UffdEventKind = 0x16
)

func (k UffdEventKind) String() string {
	switch k {
	case UffdEventPagefault:
		return "PAGEFAULT"
	case UffdEventFork:
		return "FORK"
	case UffdEventRemap:
		return "REMAP"
	case UffdEventRemove:
		return "REMOVE"
	case UffdEventUnmap:
		return "UNMAP"
	}
	return fmt.Sprintf("event%#x", uint8(k))
}

// Pagefault flags (UFFD_PAGEFAULT_FLAG_*).
const (
	UffdPagefaultWrite uint64 = 1 << 0
	UffdPagefaultWP    uint64 = 1 << 1
	UffdPagefaultMinor uint64 = 1 << 2
)

// UffdEvent is one decoded struct uffd_msg. Which fields are set depends on
// Kind; the rest are zero.
type UffdEvent struct {
	Kind UffdEventKind
	// PAGEFAULT: the faulting address, page-aligned unless the fd has
	// UffdFeatureExactAddress; Flags holds UFFD_PAGEFAULT_FLAG_*; TID the
	// faulting thread with UffdFeatureThreadID, else 0.
	Address uint64
	Flags   uint64
	TID     uint32
	// REMAP (mremap moved [From, From+Len) to To): From, To, Len.
	From, To, Len uint64
	// REMOVE (madvise DONTNEED/REMOVE) and UNMAP (munmap, mremap
	// shrinking): the range [Start, End).
	Start, End uint64
	// FORK: the child's userfaultfd, owned by the caller from ReadEvents
	// on (it must be closed even if unused). The kernel installs it in this
	// process when the message is read.
	Child *Uffd
}

// uffdMsgLen is sizeof(struct uffd_msg), pinned in uffd_test.go.
const uffdMsgLen = int(unsafe.Sizeof(uffdMsg{}))

// MaxUffdEvents bounds the events one ReadEvents call returns.
const MaxUffdEvents = 16

// ErrUffdMsg reports a message ReadEvents cannot decode.
var ErrUffdMsg = errors.New("linux: malformed uffd_msg")

// uffdMsgFields is a decoded message before its fork fd is owned: fd is
// the raw number the kernel installed (FORK only, else -1).
type uffdMsgFields struct {
	ev UffdEvent
	fd int
}

// decodeUffdMsg decodes one struct uffd_msg, as the kernel writes it in host
// order (little-endian on amd64; a kernel structure, not a wire format). An
// unknown event is returned with its Kind and no fields, for the caller to
// refuse: the kernel only reports events the fd enabled.
func decodeUffdMsg(b []byte) (uffdMsgFields, error) {
	if len(b) != uffdMsgLen {
		return uffdMsgFields{fd: -1}, fmt.Errorf("%w: %d bytes, want %d", ErrUffdMsg, len(b), uffdMsgLen)
	}
	le := binary.LittleEndian
	arg := b[8:]
	m := uffdMsgFields{ev: UffdEvent{Kind: UffdEventKind(b[0])}, fd: -1}
	switch m.ev.Kind {
	case UffdEventPagefault:
		m.ev.Flags, m.ev.Address, m.ev.TID = le.Uint64(arg[0:]), le.Uint64(arg[8:]), le.Uint32(arg[16:])
	case UffdEventFork:
		ufd := le.Uint32(arg[0:])
		if ufd > 1<<30 { // fd numbers are ints well below this (fs.nr_open)
			return m, fmt.Errorf("%w: fork fd %d", ErrUffdMsg, ufd)
		}
		m.fd = int(ufd)
	case UffdEventRemap:
		m.ev.From, m.ev.To, m.ev.Len = le.Uint64(arg[0:]), le.Uint64(arg[8:]), le.Uint64(arg[16:])
	case UffdEventRemove, UffdEventUnmap:
		m.ev.Start, m.ev.End = le.Uint64(arg[0:]), le.Uint64(arg[8:])
	}
	return m, nil
}

// ReadEvents reads the events pending on u without blocking into evs (at
// most MaxUffdEvents) and returns how many it read: 0 when none are pending.
// Reading a FORK message installs the child's fd, which ReadEvents wraps in
// UffdEvent.Child; those are the caller's even when an error is returned
// with n > 0. Use WaitReadable to block until events arrive.
func (u *Uffd) ReadEvents(evs []UffdEvent) (int, error) {
	var buf [MaxUffdEvents * uffdMsgLen]byte
	want := min(len(evs), MaxUffdEvents) * uffdMsgLen
	if want == 0 {
		return 0, nil
	}
	if u.f == nil {
		return 0, os.ErrClosed
	}
	rc, err := u.f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var nr int
	var rerr error
	if cerr := rc.Control(func(fd uintptr) {
		for {
			nr, rerr = unix.Read(int(fd), buf[:want])
			if rerr != unix.EINTR {
				return
			}
		}
	}); cerr != nil {
		return 0, cerr
	}
	if rerr == unix.EAGAIN {
		return 0, nil
	}
	if rerr != nil {
		return 0, fmt.Errorf("read userfaultfd: %w", rerr)
	}
	return decodeUffdMsgs(buf[:nr], evs)
}

// decodeUffdMsgs decodes whole messages of b into evs, wrapping every fork
// fd even past a bad message so none leaks.
func decodeUffdMsgs(b []byte, evs []UffdEvent) (int, error) {
	var err error
	if len(b)%uffdMsgLen != 0 {
		err = fmt.Errorf("%w: read %d bytes, not a multiple of %d", ErrUffdMsg, len(b), uffdMsgLen)
	}
	n := 0
	for off := 0; off+uffdMsgLen <= len(b); off += uffdMsgLen {
		m, derr := decodeUffdMsg(b[off : off+uffdMsgLen])
		if m.fd >= 0 {
			m.ev.Child = NewUffd(os.NewFile(uintptr(m.fd), "userfaultfd"))
		}
		if derr != nil && err == nil {
			err = derr
		}
		evs[n] = m.ev
		n++
	}
	return n, err
}

// WaitReadable blocks until u has events to read, without reading them. It
// may return spuriously; callers read and loop. It returns an error
// wrapping os.ErrDeadlineExceeded once a deadline set with
// File().SetReadDeadline has passed, and os.ErrClosed (or an error saying
// the file is closing) after Close.
func (u *Uffd) WaitReadable() error {
	if u.f == nil {
		return os.ErrClosed
	}
	rc, err := u.f.SyscallConn()
	if err != nil {
		return err
	}
	first := true
	// The poller forgets earlier readiness before the first call, so that
	// call looks itself (poll(2), which reads nothing); after it, the
	// poller wakes the wait for any event that arrives.
	return rc.Read(func(fd uintptr) bool {
		if !first {
			return true
		}
		first = false
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 0)
		return err != nil || n > 0
	})
}

// Wake wakes the threads waiting on faults in r without resolving them
// (UFFDIO_WAKE): they fault again.
func (u *Uffd) Wake(r UffdRange) error {
	if _, err := ioctlPtr(u.f, ioctlUffdioWake, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE %#x+%#x: %w", r.Start, r.Len, err)
	}
	return nil
}

const ioctlUffdioWake = 0x8010AA02 // _IOR(0xAA, 2, struct uffdio_range)

// OpenUffdReader is OpenUffd followed by API(want), for a userfaultfd whose
// events this process reads: the fd joins the Go poller only once
// initialised, since the poller would record a not yet initialised
// userfaultfd (EPOLLERR) as not pollable until its next event. It returns
// the features the kernel offers, as API does.
func OpenUffdReader(want UffdFeature) (*Uffd, UffdFeature, error) {
	fd, err := userfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK | uffdUserModeOnly)
	if errors.Is(err, unix.EINVAL) {
		fd, err = userfaultfd(unix.O_CLOEXEC | unix.O_NONBLOCK) // before 5.11
	}
	if err != nil {
		return nil, 0, fmt.Errorf("userfaultfd: %w", err)
	}
	arg := uffdioAPI{API: uffdAPI, Features: uint64(want)}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlUffdioAPI, uintptr(unsafe.Pointer(&arg))); errno != 0 {
		unix.Close(fd)
		return nil, 0, fmt.Errorf("UFFDIO_API %v: %w", want, errno)
	}
	return NewUffd(os.NewFile(uintptr(fd), "userfaultfd")), UffdFeature(arg.Features), nil
}

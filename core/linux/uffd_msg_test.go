package linux

import (
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestUffdMsgOffsets pins the union members' offsets of struct uffd_msg
// (include/uapi/linux/userfaultfd.h, __packed): the arg union at 8,
// pagefault {flags 8, address 16, ptid 24}, fork {ufd 8}, remap {from 8,
// to 16, len 24}, remove/unmap {start 8, end 16}.
func TestUffdMsgOffsets(t *testing.T) {
	if got := unsafe.Offsetof(uffdMsg{}.Arg); got != 8 {
		t.Fatalf("offsetof(arg) = %d, want 8", got)
	}
	if got := uintptr(ioctlUffdioWake>>16) & 0x3fff; got != unsafe.Sizeof(UffdRange{}) {
		t.Fatalf("UFFDIO_WAKE encodes size %d", got)
	}
	msg := func(kind UffdEventKind, words ...uint64) []byte {
		b := make([]byte, uffdMsgLen)
		b[0] = byte(kind)
		for i, w := range words {
			binary.LittleEndian.PutUint64(b[8+8*i:], w)
		}
		return b
	}
	tests := []struct {
		name string
		in   []byte
		want UffdEvent
		fd   int
	}{
		{"pagefault", msg(UffdEventPagefault, UffdPagefaultWrite, 0x7f0000001000, 4242), UffdEvent{Kind: UffdEventPagefault, Flags: 1, Address: 0x7f0000001000, TID: 4242}, -1},
		{"fork", msg(UffdEventFork, 17), UffdEvent{Kind: UffdEventFork}, 17},
		{"remap", msg(UffdEventRemap, 0x1000, 0x9000, 0x3000), UffdEvent{Kind: UffdEventRemap, From: 0x1000, To: 0x9000, Len: 0x3000}, -1},
		{"remove", msg(UffdEventRemove, 0x2000, 0x5000), UffdEvent{Kind: UffdEventRemove, Start: 0x2000, End: 0x5000}, -1},
		{"unmap", msg(UffdEventUnmap, 0x2000, 0x5000), UffdEvent{Kind: UffdEventUnmap, Start: 0x2000, End: 0x5000}, -1},
		{"unknown", msg(0x42, 1, 2, 3), UffdEvent{Kind: 0x42}, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := decodeUffdMsg(tt.in)
			if err != nil || m.ev != tt.want || m.fd != tt.fd {
				t.Fatalf("decode = %+v fd %d, %v; want %+v fd %d", m.ev, m.fd, err, tt.want, tt.fd)
			}
		})
	}
	if _, err := decodeUffdMsg(make([]byte, 31)); !errors.Is(err, ErrUffdMsg) {
		t.Fatalf("short message: %v, want ErrUffdMsg", err)
	}
}

// encodeUffdMsg is the inverse of decodeUffdMsg for the fields it reads.
func encodeUffdMsg(m uffdMsgFields) []byte {
	b := make([]byte, uffdMsgLen)
	b[0] = byte(m.ev.Kind)
	le, arg := binary.LittleEndian, b[8:]
	switch m.ev.Kind {
	case UffdEventPagefault:
		le.PutUint64(arg[0:], m.ev.Flags)
		le.PutUint64(arg[8:], m.ev.Address)
		le.PutUint32(arg[16:], m.ev.TID)
	case UffdEventFork:
		le.PutUint32(arg[0:], uint32(m.fd))
	case UffdEventRemap:
		le.PutUint64(arg[0:], m.ev.From)
		le.PutUint64(arg[8:], m.ev.To)
		le.PutUint64(arg[16:], m.ev.Len)
	case UffdEventRemove, UffdEventUnmap:
		le.PutUint64(arg[0:], m.ev.Start)
		le.PutUint64(arg[8:], m.ev.End)
	}
	return b
}

func FuzzDecodeUffdMsg(f *testing.F) {
	f.Add(encodeUffdMsg(uffdMsgFields{ev: UffdEvent{Kind: UffdEventPagefault, Address: 0x1000, Flags: 1}}))
	f.Add(encodeUffdMsg(uffdMsgFields{ev: UffdEvent{Kind: UffdEventFork}, fd: 5}))
	f.Add(encodeUffdMsg(uffdMsgFields{ev: UffdEvent{Kind: UffdEventRemap, From: 1, To: 2, Len: 3}}))
	f.Add(encodeUffdMsg(uffdMsgFields{ev: UffdEvent{Kind: UffdEventUnmap, Start: 1, End: 2}}))
	f.Add(make([]byte, 33))
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := decodeUffdMsg(in)
		if err != nil {
			if m.fd >= 0 && len(in) != uffdMsgLen {
				t.Fatalf("fd %d from a message of %d bytes", m.fd, len(in))
			}
			return
		}
		if m.fd >= 0 != (m.ev.Kind == UffdEventFork) {
			t.Fatalf("fd %d for event %v", m.fd, m.ev.Kind)
		}
		m2, err := decodeUffdMsg(encodeUffdMsg(m))
		if err != nil || m2 != m {
			t.Fatalf("round trip %+v -> %+v, %v", m, m2, err)
		}
	})
}

// testRegion maps n anonymous private pages and registers them with u in
// MISSING mode.
func testRegion(t *testing.T, u *Uffd, pages int) []byte {
	t.Helper()
	mem, err := unix.Mmap(-1, 0, pages*os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	if err := u.Register(UffdRange{Start: addrOf(mem), Len: uint64(len(mem))}, UffdRegisterMissing); err != nil {
		t.Fatal(err)
	}
	return mem
}

func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

// nextEvent waits up to 10 s for one event on u.
func nextEvent(t *testing.T, u *Uffd) UffdEvent {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	u.File().SetReadDeadline(deadline)
	defer u.File().SetReadDeadline(time.Time{})
	var evs [1]UffdEvent
	for {
		n, err := u.ReadEvents(evs[:])
		if err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			return evs[0]
		}
		if err := u.WaitReadable(); err != nil {
			t.Fatalf("wait for an event: %v", err)
		}
	}
}

// TestUffdEvents has the kernel write real messages: a fault, REMOVE,
// REMAP and UNMAP on this process's own memory, each caused by a
// goroutine the kernel blocks until the event is read.
func TestUffdEvents(t *testing.T) {
	requireFeature(t, func() error {
		return HaveUffdFeatures(UffdFeatureEventRemap | UffdFeatureEventRemove | UffdFeatureEventUnmap)
	})
	u, _, err := OpenUffdReader(UffdFeatureEventRemap | UffdFeatureEventRemove | UffdFeatureEventUnmap)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if n, err := u.ReadEvents(make([]UffdEvent, 4)); n != 0 || err != nil {
		t.Fatalf("idle fd: %d events, %v", n, err)
	}
	ps := os.Getpagesize()
	mem := testRegion(t, u, 8)
	base := addrOf(mem)

	got := make(chan byte)
	go func() {
		b := mem[3*ps+5] // blocks in the fault until Copy
		got <- b         // (sending mem[i] itself would read it only on receipt)
	}()
	ev := nextEvent(t, u)
	if ev.Kind != UffdEventPagefault || ev.Address != base+uint64(3*ps) || ev.Flags&UffdPagefaultWrite != 0 {
		t.Fatalf("fault event %+v, want a read at %#x", ev, base+uint64(3*ps))
	}
	page := make([]byte, ps)
	page[5] = 0xa5
	if n, err := u.Copy(ev.Address, page); n != ps || err != nil {
		t.Fatalf("copy: %d, %v", n, err)
	}
	if b := <-got; b != 0xa5 {
		t.Fatalf("read %#x after the copy, want 0xa5", b)
	}

	events := func(call func() error) []UffdEvent { return callEvents(t, u, call) }
	one := func(evs []UffdEvent, want UffdEvent) {
		t.Helper()
		if len(evs) != 1 || evs[0] != want {
			t.Fatalf("events %+v, want %+v", evs, want)
		}
	}

	one(events(func() error { return unix.Madvise(mem[ps:3*ps], unix.MADV_DONTNEED) }),
		UffdEvent{Kind: UffdEventRemove, Start: base + uint64(ps), End: base + uint64(3*ps)})

	// x/sys's Mremap and Munmap take only whole mappings it made: raw calls.
	var moved uint64
	evs := events(func() error {
		// Growing into the mapped pages after it, the range must move.
		r, _, errno := unix.Syscall6(unix.SYS_MREMAP, uintptr(base)+uintptr(4*ps), uintptr(2*ps), uintptr(3*ps), unix.MREMAP_MAYMOVE, 0, 0)
		moved = uint64(r)
		return errnoErr(errno)
	})
	// Linux 6.18 reports the move, then the old range's unmapping.
	if want := []UffdEvent{
		{Kind: UffdEventRemap, From: base + uint64(4*ps), To: moved, Len: uint64(2 * ps)},
		{Kind: UffdEventUnmap, Start: base + uint64(4*ps), End: base + uint64(6*ps)},
	}; len(evs) < 1 || evs[0] != want[0] || len(evs) > 2 || len(evs) == 2 && evs[1] != want[1] {
		t.Fatalf("mremap events %+v, want %+v (the second optional)", evs, want)
	}
	one(events(func() error {
		_, _, errno := unix.Syscall(unix.SYS_MUNMAP, uintptr(moved), uintptr(3*ps), 0)
		return errnoErr(errno)
	}), UffdEvent{Kind: UffdEventUnmap, Start: moved, End: moved + uint64(3*ps)})
}

// callEvents runs call, which blocks until the kernel's events for it are
// read, and collects those events until it returns.
func callEvents(t *testing.T, u *Uffd, call func() error) []UffdEvent {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- call() }()
	var evs []UffdEvent
	buf := make([]UffdEvent, MaxUffdEvents)
	deadline := time.Now().Add(10 * time.Second)
	defer u.File().SetReadDeadline(time.Time{})
	for {
		n, err := u.ReadEvents(buf)
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, buf[:n]...)
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			return evs
		default:
		}
		if n > 0 {
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("call still blocked after 10 s, events so far %+v", evs)
		}
		// An event, or the deadline to look at done again.
		u.File().SetReadDeadline(time.Now().Add(5 * time.Millisecond))
		u.WaitReadable()
	}
}

// TestUffdWaitReadableDeadline shows a waiter is released by a deadline
// and by Close.
func TestUffdWaitReadableDeadline(t *testing.T) {
	requireFeature(t, HaveUserfaultfd)
	u, _, err := OpenUffdReader(0)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	u.File().SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if err := u.WaitReadable(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("wait past the deadline: %v", err)
	}
	u.File().SetReadDeadline(time.Time{})
	done := make(chan error)
	go func() { done <- u.WaitReadable() }()
	// Closing the file (not u, whose field the waiter reads) is the event
	// under test; done before the wait starts, the wait fails as well.
	time.AfterFunc(20*time.Millisecond, func() { u.File().Close() })
	if err := <-done; err == nil {
		t.Fatal("wait returned nil after Close")
	}
}

func errnoErr(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

package linux

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// LoopbackPeerUID returns the uid that owns the other end of an
// established loopback TCP connection: the socket whose local address is
// peer and whose remote address is local, as /proc/net/tcp and tcp6 of
// this network namespace list it. TCP has no SO_PEERCRED; on loopback the
// peer's socket is in the same table. It fails if no such socket is
// listed (the peer closed, or it is not on this host).
//
// The kernel builds these tables a chunk at a time from its hash tables,
// so a read while other sockets come and go can miss a line: a socket not
// found is looked for again a few times before the error.
//
// The tables are read through /proc/thread-self/net on a locked thread:
// /proc/net is /proc/self/net, the main thread's namespace, which a
// thread locked into another namespace by InNetns may have left there
// (Go parks, never ends, the main thread; seen in this package's tests).
func LoopbackPeerUID(local, peer netip.AddrPort) (int, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for attempt := 0; attempt < 5; attempt++ {
		for _, name := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
			uid, ok, err := findTCPOwner(name, peer, local)
			if err != nil {
				return 0, err
			}
			if ok {
				return uid, nil
			}
		}
		time.Sleep(time.Duration(attempt+1) * time.Millisecond) // nothing to wait on: the table is a snapshot
	}
	return 0, fmt.Errorf("owner of %v: %w: no such socket", peer, os.ErrNotExist)
}

// findTCPOwner scans one table for the socket local -> remote.
func findTCPOwner(path string, local, remote netip.AddrPort) (int, bool, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) < 8 {
			continue
		}
		l, err1 := parseProcAddr(fl[1])
		r, err2 := parseProcAddr(fl[2])
		if err1 != nil || err2 != nil {
			continue
		}
		if l.Addr().Unmap() == local.Addr().Unmap() && l.Port() == local.Port() &&
			r.Addr().Unmap() == remote.Addr().Unmap() && r.Port() == remote.Port() {
			uid, err := strconv.Atoi(fl[7])
			if err != nil {
				return 0, false, fmt.Errorf("%s: uid %q", path, fl[7])
			}
			return uid, true, nil
		}
	}
	return 0, false, sc.Err()
}

// parseProcAddr reads "0100007F:1F90" (IPv4) or 32 hex digits (IPv6),
// each 32-bit word in host (little-endian) order, then the port in hex.
func parseProcAddr(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q", s)
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q", p)
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q", a)
	}
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(raw[i:], binary.LittleEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// AddrPortOf converts a TCP address.
func AddrPortOf(a net.Addr) (netip.AddrPort, error) {
	t, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("%v: not a TCP address", a)
	}
	return t.AddrPort(), nil
}

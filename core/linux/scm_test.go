package linux

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// unixPair returns two connected stream sockets over a listening path, as
// CRIU's restore and its lazy-pages daemon are.
func unixPair(t *testing.T) (client, server *net.UnixConn) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(t.TempDir(), "s"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err = net.DialUnix("unix", nil, l.Addr().(*net.UnixAddr))
	if err != nil {
		t.Fatal(err)
	}
	server, err = l.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestRecvFDs passes a pipe's write end after a plain record, as CRIU's
// restore sends a pid and then a userfaultfd, and reads both back with
// exact sizes.
func TestRecvFDs(t *testing.T) {
	client, server := unixPair(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if _, err := client.Write([]byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	if err := SendFD(client, []byte{0}, w); err != nil {
		t.Fatal(err)
	}
	var word [4]byte
	n, files, err := RecvFDs(server, word[:])
	if err != nil || n != 4 || len(files) != 0 {
		t.Fatalf("record: %d bytes, %d files, %v", n, len(files), err)
	}
	var one [1]byte
	n, files, err = RecvFDs(server, one[:])
	if err != nil || n != 1 || len(files) != 1 {
		t.Fatalf("fd message: %d bytes, %d files, %v", n, len(files), err)
	}
	got := files[0]
	defer got.Close()
	rc, _ := got.SyscallConn()
	var flags int
	rc.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFD, 0) })
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("received fd flags %#x, %v: want close-on-exec", flags, err)
	}
	if _, err := got.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(one[:]); err != nil || one[0] != 'x' {
		t.Fatalf("pipe read %q, %v", one[:], err)
	}
}

// TestRecvFDsTruncated sends more descriptors than RecvFDs takes.
func TestRecvFDsTruncated(t *testing.T) {
	client, server := unixPair(t)
	fds := make([]int, MaxRecvFDs+1)
	for i := range fds {
		fds[i] = int(os.Stdin.Fd())
	}
	if _, _, err := client.WriteMsgUnix([]byte{0}, unix.UnixRights(fds...), nil); err != nil {
		t.Fatal(err)
	}
	var one [1]byte
	_, files, err := RecvFDs(server, one[:])
	for _, f := range files {
		f.Close()
	}
	if !errors.Is(err, ErrControlTruncated) {
		t.Fatalf("%d fds: %v, want ErrControlTruncated", len(fds), err)
	}
}

package linux

import (
	"bytes"
	"testing"

	"golang.org/x/sys/unix"
)

func TestSeqpacketPair(t *testing.T) {
	before := countFDs(t)
	local, remote, err := SeqpacketPair()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := remote.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var typ, fl int
	var serr, ferr error
	rc.Control(func(fd uintptr) {
		typ, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE)
		fl, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0)
	})
	if serr != nil || typ != unix.SOCK_SEQPACKET {
		t.Errorf("remote SO_TYPE %d, %v; want SOCK_SEQPACKET", typ, serr)
	}
	if ferr != nil || fl&unix.O_NONBLOCK != 0 {
		t.Errorf("remote flags %#x, %v; want blocking for the child", fl, ferr)
	}

	// Message boundaries survive in both directions.
	msgs := [][]byte{[]byte("first"), bytes.Repeat([]byte{7}, 3000), []byte("x")}
	for _, m := range msgs {
		if _, err := remote.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 4096)
	for _, want := range msgs {
		n, _, _, _, err := local.ReadMsgUnix(buf, nil)
		if err != nil || !bytes.Equal(buf[:n], want) {
			t.Fatalf("read %d bytes, %v; want %d", n, err, len(want))
		}
	}
	if _, err := local.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	if n, err := remote.Read(buf); err != nil || string(buf[:n]) != "reply" {
		t.Errorf("remote read %q, %v", buf[:n], err)
	}
	if err := remote.Close(); err != nil {
		t.Fatal(err)
	}
	if n, err := local.Read(buf); n != 0 {
		t.Errorf("read after peer close: %d, %v; want EOF", n, err)
	}
	if err := local.Close(); err != nil {
		t.Fatal(err)
	}
	if after := countFDs(t); after != before {
		t.Errorf("%d fds before, %d after", before, after)
	}
}

package linux

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestLoopbackPeerUID: the owner of a loopback connection's other end is
// found: this process (the test's uid) and a child dialing as uid 65534.
func TestLoopbackPeerUID(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	owner := func(c net.Conn) int {
		t.Helper()
		l, _ := AddrPortOf(c.LocalAddr())
		r, _ := AddrPortOf(c.RemoteAddr())
		uid, err := LoopbackPeerUID(l, r)
		if err != nil {
			t.Fatal(err)
		}
		return uid
	}
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := owner(s); got != os.Geteuid() {
		t.Fatalf("own connection owned by uid %d, want %d", got, os.Geteuid())
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIP: a connection from another uid needs root to make")
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("SKIP: no bash to dial as another user")
	}
	port := ln.Addr().(*net.TCPAddr).Port
	cmd := exec.Command(bash, "-c", "exec 3<>/dev/tcp/127.0.0.1/"+strconv.Itoa(port)+"; sleep 30")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	s2, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got := owner(s2); got != 65534 {
		t.Fatalf("connection from uid 65534 owned by uid %d", got)
	}
}

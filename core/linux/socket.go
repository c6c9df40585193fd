package linux

import (
	"fmt"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// SeqpacketPair returns the two ends of an AF_UNIX SOCK_SEQPACKET
// socketpair(2), the transport of CRIU's swrk RPC: local, non-blocking and
// in the Go poller, for this process; remote, blocking, to hand to a child
// through exec.Cmd.ExtraFiles (which clears its close-on-exec flag). Both
// are close-on-exec here. The caller owns both and closes remote once the
// child has started.
func SeqpacketPair() (local *net.UnixConn, remote *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	lf := os.NewFile(uintptr(fds[0]), "seqpacket-local")
	remote = os.NewFile(uintptr(fds[1]), "seqpacket-remote")
	c, err := net.FileConn(lf) // a dup; lf is closed below either way
	if cerr := lf.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		remote.Close()
		if c != nil {
			c.Close()
		}
		return nil, nil, fmt.Errorf("socketpair conn: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		remote.Close()
		return nil, nil, fmt.Errorf("socketpair conn: got %T", c)
	}
	return uc, remote, nil
}

// SetTCPNotSentLowat bounds the unsent bytes the kernel queues on a TCP
// socket (TCP_NOTSENT_LOWAT, Linux 3.12): writers block instead of filling
// megabytes of send buffer, so a small control message is not queued behind
// them. Its signature fits net.Dialer.Control and net.ListenConfig.Control.
func SetTCPNotSentLowat(bytes int) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, bytes)
		})
		if err == nil {
			err = serr
		}
		if err != nil {
			return fmt.Errorf("set TCP_NOTSENT_LOWAT: %w", err)
		}
		return nil
	}
}

// StreamPair returns a connected AF_UNIX SOCK_STREAM pair: local is
// registered with the runtime poller, remote is a plain file to hand to a
// child (exec.Cmd.ExtraFiles), as CRIU's --ps-socket takes it. Both are
// close-on-exec; the caller owns both and closes remote once the child has
// it.
func StreamPair() (local net.Conn, remote *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	lf := os.NewFile(uintptr(fds[0]), "stream-local")
	defer lf.Close() // FileConn dups it
	remote = os.NewFile(uintptr(fds[1]), "stream-remote")
	local, err = net.FileConn(lf)
	if err != nil {
		remote.Close()
		return nil, nil, fmt.Errorf("stream conn: %w", err)
	}
	return local, remote, nil
}

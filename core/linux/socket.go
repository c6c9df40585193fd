package linux

import (
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// SeqpacketPair returns a connected AF_UNIX SOCK_SEQPACKET pair: local is
// registered with the runtime poller (Close unblocks its readers), remote is
// a plain file meant to be handed to a child (exec.Cmd.ExtraFiles). Both are
// close-on-exec; the caller owns both and must close remote once the child
// has started.
func SeqpacketPair() (local *net.UnixConn, remote *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	lf := os.NewFile(uintptr(fds[0]), "seqpacket-local")
	defer lf.Close() // FileConn dups it
	remote = os.NewFile(uintptr(fds[1]), "seqpacket-remote")
	c, err := net.FileConn(lf)
	if err != nil {
		remote.Close()
		return nil, nil, fmt.Errorf("seqpacket conn: %w", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		remote.Close()
		return nil, nil, fmt.Errorf("seqpacket conn: unexpected type %T", c)
	}
	return uc, remote, nil
}

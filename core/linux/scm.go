package linux

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// ErrControlTruncated reports ancillary data the kernel cut short: file
// descriptors were sent that did not fit and are lost (closed).
var ErrControlTruncated = errors.New("linux: SCM_RIGHTS truncated")

// MaxRecvFDs bounds the descriptors RecvFDs accepts with one message.
const MaxRecvFDs = 8

// RecvFDs reads from c into b like Read and returns, besides the bytes, the
// file descriptors that came with them (SCM_RIGHTS) as files the caller
// owns, close-on-exec. Non-blocking descriptors join the Go poller. On a
// stream socket the descriptors come with the first byte of the write that
// carried them, and that write ends the read (no later bytes join it), but
// earlier bytes may: read exactly the bytes that precede them to keep the
// sender's boundaries. More than MaxRecvFDs descriptors in one message is
// ErrControlTruncated; the excess is lost.
func RecvFDs(c *net.UnixConn, b []byte) (n int, files []*os.File, err error) {
	oob := make([]byte, unix.CmsgSpace(MaxRecvFDs*4))
	// net sets MSG_CMSG_CLOEXEC on Linux.
	n, oobn, flags, _, err := c.ReadMsgUnix(b, oob)
	if oobn > 0 {
		var perr error
		files, perr = parseRights(oob[:oobn])
		if err == nil {
			err = perr
		}
	}
	if err == nil && flags&unix.MSG_CTRUNC != 0 {
		err = ErrControlTruncated
	}
	if err != nil {
		return n, files, fmt.Errorf("recvmsg: %w", err)
	}
	return n, files, nil
}

// parseRights returns the descriptors of every SCM_RIGHTS message in oob as
// files; other control messages are ignored.
func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("control message: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			return files, fmt.Errorf("SCM_RIGHTS: %w", err)
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "scm-rights"))
		}
	}
	return files, nil
}

// SendFD writes b with f attached (SCM_RIGHTS) in one sendmsg; b must not
// be empty. f stays the caller's, and in the mode it was (unlike f.Fd, this
// does not make a pollable file blocking).
func SendFD(c *net.UnixConn, b []byte, f *os.File) error {
	if len(b) == 0 {
		return errors.New("send fd: empty payload")
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("send fd: %w", err)
	}
	var werr error
	if cerr := rc.Control(func(fd uintptr) {
		_, _, werr = c.WriteMsgUnix(b, unix.UnixRights(int(fd)), nil)
	}); cerr != nil {
		return fmt.Errorf("send fd: %w", cerr)
	}
	if werr != nil {
		return fmt.Errorf("sendmsg: %w", werr)
	}
	return nil
}

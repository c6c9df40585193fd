package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// The netlink half of nftables.go: one NETLINK_NETFILTER socket, nftables
// transactions, and the message and attribute codec. Netlink and attribute
// headers are in host order, as the protocol defines them; nfgenmsg's
// res_id and nftables' numeric attributes are big-endian.

const (
	nlRecvBytes    = 64 << 10 // netlink_dump fills at most 32 KiB; MSG_TRUNC is checked anyway
	nlReplyTimeout = 10 * time.Second
)

// nfnlConn is one NETLINK_NETFILTER socket, used by one goroutine.
type nfnlConn struct {
	fd  int
	seq uint32
}

func dialNfnl() (*nfnlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if errors.Is(err, unix.EPROTONOSUPPORT) {
		return nil, fmt.Errorf("netlink netfilter socket: %w (kernel without nfnetlink): %w", ErrNotSupported, err)
	}
	if err != nil {
		return nil, fmt.Errorf("netlink netfilter socket: %w", err)
	}
	// Bounds the wait for a reply that never comes; recv retries EINTR.
	tv := unix.NsecToTimeval(nlReplyTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink netfilter socket: SO_RCVTIMEO: %w", err)
	}
	return &nfnlConn{fd: fd, seq: uint32(time.Now().Unix())}, nil
}

func (c *nfnlConn) close() {
	if c.fd >= 0 {
		unix.Close(c.fd) // nothing written that a failed close could lose
		c.fd = -1
	}
}

func (c *nfnlConn) nextSeq() uint32 { c.seq++; return c.seq }

func (c *nfnlConn) send(b []byte) error {
	for {
		err := unix.Sendto(c.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if err != unix.EINTR {
			return err
		}
	}
}

// recv returns the next datagram from the kernel. A socket with
// SO_RCVTIMEO returns EINTR on every signal, SA_RESTART or not.
func (c *nfnlConn) recv() ([]byte, error) {
	b := make([]byte, nlRecvBytes)
	for {
		n, _, flags, from, err := unix.Recvmsg(c.fd, b, nil, 0)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return nil, fmt.Errorf("no reply from the kernel in %v: %w", nlReplyTimeout, err)
		case err != nil:
			return nil, err
		case flags&unix.MSG_TRUNC != 0:
			return nil, fmt.Errorf("netlink reply larger than %d bytes", nlRecvBytes)
		}
		if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
			continue // not from the kernel
		}
		return b[:n], nil
	}
}

// nftOp is one message of an nftables transaction.
type nftOp struct {
	msg    uint16 // NFT_MSG_*
	flags  uint16 // beyond NLM_F_REQUEST|NLM_F_ACK
	family uint8
	attrs  []byte
}

// batch sends ops as one transaction (NFNL_MSG_BATCH_BEGIN ... END): all
// or nothing. Each op asks for an ack; the first error reported wins.
func (c *nfnlConn) batch(ops ...nftOp) error {
	resID := uint16(unix.NFNL_SUBSYS_NFTABLES)
	b := appendNfMsg(nil, unix.NFNL_MSG_BATCH_BEGIN, unix.NLM_F_REQUEST, c.nextSeq(), unix.AF_UNSPEC, resID, nil)
	pending := make(map[uint32]bool, len(ops))
	for _, op := range ops {
		seq := c.nextSeq()
		pending[seq] = true
		b = appendNfMsg(b, nftMsgType(op.msg), unix.NLM_F_REQUEST|unix.NLM_F_ACK|op.flags, seq, op.family, 0, op.attrs)
	}
	b = appendNfMsg(b, unix.NFNL_MSG_BATCH_END, unix.NLM_F_REQUEST, c.nextSeq(), unix.AF_UNSPEC, resID, nil)
	if err := c.send(b); err != nil {
		return err
	}
	// The kernel acks each op (error 0) once the batch is done, and
	// reports an error against whichever message failed, BATCH_BEGIN too.
	for len(pending) > 0 {
		reply, err := c.recv()
		if err != nil {
			return err
		}
		msgs, err := parseNlMsgs(reply)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.typ != unix.NLMSG_ERROR {
				continue
			}
			if err := decodeNlErr(m.data); err != nil {
				return err
			}
			delete(pending, m.seq)
		}
	}
	return nil
}

// appendNfMsg appends one netlink message with an nfgenmsg header.
func appendNfMsg(b []byte, typ, flags uint16, seq uint32, family uint8, resID uint16, attrs []byte) []byte {
	b = binary.NativeEndian.AppendUint32(b, uint32(unix.SizeofNlMsghdr+nfgenmsgBytes+len(attrs)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port id: the kernel fills it in
	b = append(b, family, unix.NFNETLINK_V0)
	b = binary.BigEndian.AppendUint16(b, resID)
	return append(b, attrs...)
}

// appendAttr appends one attribute, padded to 4 bytes; b must start at a
// 4-byte boundary of the message.
func appendAttr(b []byte, typ uint16, val []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.SizeofNlAttr+len(val)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, val...)
	return append(b, make([]byte, nlAlign(len(val))-len(val))...)
}

func appendStringAttr(b []byte, typ uint16, s string) []byte {
	return appendAttr(b, typ, append([]byte(s), 0))
}

func nlAlign(n int) int { return (n + 3) &^ 3 }

// nlMsg is one netlink message; data aliases the datagram.
type nlMsg struct {
	typ, flags uint16
	seq        uint32
	data       []byte // after struct nlmsghdr
}

// parseNlMsgs splits a datagram into messages. A length that leaves the
// datagram or undercuts the header is an error.
func parseNlMsgs(b []byte) ([]nlMsg, error) {
	var msgs []nlMsg
	for len(b) > 0 {
		if len(b) < unix.SizeofNlMsghdr {
			return nil, fmt.Errorf("netlink: %d trailing bytes", len(b))
		}
		n := binary.NativeEndian.Uint32(b[0:4])
		if n < unix.SizeofNlMsghdr || uint64(n) > uint64(len(b)) {
			return nil, fmt.Errorf("netlink: message length %d of %d bytes", n, len(b))
		}
		msgs = append(msgs, nlMsg{
			typ:   binary.NativeEndian.Uint16(b[4:6]),
			flags: binary.NativeEndian.Uint16(b[6:8]),
			seq:   binary.NativeEndian.Uint32(b[8:12]),
			data:  b[unix.SizeofNlMsghdr:n],
		})
		b = b[min(nlAlign(int(n)), len(b)):]
	}
	return msgs, nil
}

// parseAttrs calls fn for each attribute of b, its type without the
// NLA_F_NESTED and NLA_F_NET_BYTEORDER bits.
func parseAttrs(b []byte, fn func(typ uint16, val []byte)) error {
	for len(b) > 0 {
		if len(b) < unix.SizeofNlAttr {
			return fmt.Errorf("netlink attribute: %d trailing bytes", len(b))
		}
		n := int(binary.NativeEndian.Uint16(b[0:2]))
		if n < unix.SizeofNlAttr || n > len(b) {
			return fmt.Errorf("netlink attribute: length %d of %d bytes", n, len(b))
		}
		fn(binary.NativeEndian.Uint16(b[2:4])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER), b[unix.SizeofNlAttr:n])
		b = b[min(nlAlign(n), len(b)):]
	}
	return nil
}

// decodeNlErr decodes the payload of NLMSG_ERROR (and of NLMSG_DONE,
// which starts the same way): nil for an ack, else the errno.
func decodeNlErr(data []byte) error {
	if len(data) < 4 {
		return fmt.Errorf("netlink: error message of %d bytes", len(data))
	}
	e := int32(binary.NativeEndian.Uint32(data[0:4]))
	switch {
	case e == 0:
		return nil
	case e < 0 && e > -4096: // MAX_ERRNO
		return unix.Errno(-e)
	}
	return fmt.Errorf("netlink: error code %d", e)
}

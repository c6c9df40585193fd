package pageserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"github.com/phaul/phaul/core/pagestore"
)

// Client speaks the sending side of the protocol (what criu dump and the
// lazy-pages daemon send) in the CRIU 4.2 layout on one connection, which
// it owns. It checks every request against spec.md before sending it. It is
// not safe for concurrent use; set deadlines on the connection to bound its
// calls, or Close it from another goroutine to abort them.
type Client struct {
	nc  net.Conn
	r   *bufio.Reader
	hdr []byte // HeaderLen bytes of scratch
}

// NewClient returns a Client on nc, which it owns from now on.
func NewClient(nc net.Conn) *Client {
	return &Client{nc: nc, r: bufio.NewReaderSize(nc, readBufferSize), hdr: make([]byte, 0, HeaderLen)}
}

// Dial connects to a page server at addr ("host:port"), inside TLS if
// tlsConf is set, and returns a Client for one session.
func Dial(ctx context.Context, addr string, tlsConf *tls.Config) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial page server %s: %w", addr, err)
	}
	if tlsConf != nil {
		tc := tls.Client(nc, tlsConf)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, fmt.Errorf("dial page server %s: %w", addr, err)
		}
		nc = tc
	}
	return NewClient(nc), nil
}

// Open sends OPEN2 for pagemap k and returns the server's has_parent.
func (c *Client) Open(k pagestore.Key) (hasParent bool, err error) {
	dst, err := dstIDOf(k)
	if err != nil {
		return false, err
	}
	if err := c.send(header{cmd: CmdOpen2, dstID: dst}, nil); err != nil {
		return false, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return false, fmt.Errorf("OPEN2 reply: %w", err)
	}
	if b[0] > 1 {
		return false, fmt.Errorf("%w: OPEN2 reply %d", ErrHeader, b[0])
	}
	return b[0] == 1, nil
}

// Parent sends PARENT for pagemap k and returns the server's answer: does
// its parent image hold k.
func (c *Client) Parent(k pagestore.Key) (bool, error) {
	dst, err := dstIDOf(k)
	if err != nil {
		return false, err
	}
	if err := c.send(header{cmd: CmdParent, dstID: dst}, nil); err != nil {
		return false, err
	}
	v, err := c.readInt32("PARENT")
	if err != nil {
		return false, err
	}
	return v == 1, nil
}

// Add sends one ADD_F range of pagemap k; flags are Flags bits (the
// pagestore flags share them) and data holds nrPages*PageSize bytes iff
// flags has FlagPresent. The server opens k if it is not the open pagemap.
func (c *Client) Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	dst, err := dstIDOf(k)
	if err != nil {
		return err
	}
	if flags > 0xffff {
		return fmt.Errorf("%w: flags %#x", ErrHeader, flags)
	}
	h := header{cmd: CmdAddF, flags: Flags(flags), nrPages: nrPages, vaddr: vaddr, dstID: dst}
	if _, err := checkRequest(h); err != nil {
		return err
	}
	want := 0
	if h.hasData() {
		want = int(nrPages) * PageSize // bounded by checkRequest
	}
	if len(data) != want {
		return fmt.Errorf("%w: %v with %d bytes of data, want %d", ErrHeader, h, len(data), want)
	}
	return c.send(h, data)
}

// Get sends GET for len(buf)/PageSize pages of task vpid at vaddr and reads
// the reply into buf. The server may send fewer pages than asked: nrPages
// says how many it sent. A server without the page at vaddr closes the
// connection.
func (c *Client) Get(vpid, vaddr uint64, buf []byte) (nrPages uint64, err error) {
	if len(buf) == 0 || len(buf)%PageSize != 0 {
		return 0, fmt.Errorf("%w: GET into %d bytes", ErrHeader, len(buf))
	}
	req := header{cmd: CmdGet, nrPages: uint64(len(buf) / PageSize), vaddr: vaddr, dstID: vpid}
	if _, err := checkRequest(req); err != nil {
		return 0, err
	}
	if err := c.send(req, nil); err != nil {
		return 0, err
	}
	var b [HeaderLen]byte
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return 0, fmt.Errorf("GET reply: %w", err)
	}
	rep := decodeHeader(&b)
	if err := checkGetReply(req, rep); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(c.r, buf[:rep.nrPages*PageSize]); err != nil {
		return 0, fmt.Errorf("GET reply pages: %w", err)
	}
	return rep.nrPages, nil
}

// checkGetReply checks a GET reply against its request (spec.md §3.1).
func checkGetReply(req, rep header) error {
	if rep.cmd != CmdAddF || rep.flags != FlagPresent || rep.vaddr != req.vaddr || rep.dstID != req.dstID ||
		rep.nrPages == 0 || rep.nrPages > req.nrPages {
		return fmt.Errorf("%w: GET reply %v to %v", ErrHeader, rep, req)
	}
	return nil
}

// Close sends CLOSE, reads the server's status, and closes the connection.
// A non-zero status (the server could not commit) is ErrStatus.
func (c *Client) Close() error {
	return c.close(CmdClose)
}

// ForceClose is Close with FORCE_CLOSE, which CRIU sends on a socket it
// was handed and cannot close itself.
func (c *Client) ForceClose() error {
	return c.close(CmdForceClose)
}

func (c *Client) close(cmd Command) error {
	err := c.send(header{cmd: cmd}, nil)
	if err == nil {
		var v int32
		v, err = c.readInt32(cmd.String())
		if err == nil && v != statusOK {
			err = fmt.Errorf("%w: %v status %d", ErrStatus, cmd, v)
		}
	}
	return errors.Join(err, c.nc.Close())
}

// Abort closes the connection without CLOSE: the server commits nothing.
func (c *Client) Abort() error {
	return c.nc.Close()
}

func (c *Client) send(h header, data []byte) error {
	bufs := net.Buffers{appendHeader(c.hdr[:0], h)}
	if len(data) > 0 {
		bufs = append(bufs, data)
	}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		return fmt.Errorf("send %v: %w", h.cmd, err)
	}
	return nil
}

func (c *Client) readInt32(what string) (int32, error) {
	var b [4]byte
	if _, err := io.ReadFull(c.r, b[:]); err != nil {
		return 0, fmt.Errorf("%s reply: %w", what, err)
	}
	return int32(binary.LittleEndian.Uint32(b[:])), nil
}

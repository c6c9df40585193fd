package transport

import (
	"net"
	"sync/atomic"
)

// countingConn counts the bytes that cross a connection, TLS records and
// yamux frames included: what a migration costs on the wire.
type countingConn struct {
	net.Conn
	read, written atomic.Uint64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.read.Add(uint64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.written.Add(uint64(n))
	return n, err
}

// BytesWire returns the bytes read from and written to the session's TCP
// connection so far, handshake included. Safe for concurrent use.
func (s *Session) BytesWire() uint64 {
	if s.wire == nil {
		return 0
	}
	return s.wire.read.Load() + s.wire.written.Load()
}

package transport

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
)

// prefaceAccepted is the byte a server writes once it has verified the
// client's certificate. In TLS 1.3 the client's handshake completes before
// the server has checked the client certificate; the preface turns a
// refusal into an error from Dial rather than from the first stream.
const prefaceAccepted = 0x01

// Dial connects to addr ("HOST:PORT"), runs the TLS 1.3 handshake with
// mutual authentication and returns the session. The server's certificate
// must chain to cfg.Identity's CA and name HOST (a DNS SAN, or an IP SAN for
// an IP literal). ctx and cfg.HandshakeTimeout bound connecting and the
// handshake, not the session.
//
// Errors: a TCP failure wraps the *net.OpError (errors.Is(err,
// syscall.ECONNREFUSED) and the like work); an untrusted server certificate
// wraps ErrPeerNotTrusted; a certificate not naming HOST wraps
// ErrNameMismatch; a server refusing our certificate gives ErrPeerRejected.
func Dial(ctx context.Context, addr string, cfg Config) (*Session, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	log := cfg.logger().With("peer", addr)
	d := net.Dialer{Timeout: cfg.HandshakeTimeout, Control: cfg.Control}
	tcp, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	raw := &countingConn{Conn: tcp}
	conn := tls.Client(raw, cfg.Identity.clientTLS(host))
	err = withDeadline(ctx, cfg.HandshakeTimeout, raw.SetDeadline, func() error {
		if err := conn.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("tls handshake: %w", classifyDial(err))
		}
		if err := checkALPN(conn); err != nil {
			return err
		}
		return readPreface(conn)
	})
	if err != nil {
		_ = raw.Close() // abandoned; the handshake error is the one to report
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	s, err := newSession(conn, cfg, log, true)
	if s != nil {
		s.wire = raw
	}
	if err != nil {
		_ = raw.Close()
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return s, nil
}

// readPreface reads the server's acceptance byte.
func readPreface(conn *tls.Conn) error {
	var b [1]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return fmt.Errorf("read preface: %w", classifyDial(err))
	}
	if b[0] != prefaceAccepted {
		return fmt.Errorf("read preface: %w: byte %#x", ErrProtocol, b[0])
	}
	return nil
}

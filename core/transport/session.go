package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// StreamKind says what a stream carries. It is the first byte the dialer
// writes on every stream.
type StreamKind uint8

const (
	KindControl StreamKind = 1 // control messages; the first stream, yamux ID 1
	KindImages  StreamKind = 2 // CRIU image files
	KindPages   StreamKind = 3 // memory pages
	KindFetch   StreamKind = 4 // post-copy page requests and their pages
)

func (k StreamKind) String() string {
	switch k {
	case KindControl:
		return "control"
	case KindImages:
		return "images"
	case KindPages:
		return "pages"
	case KindFetch:
		return "fetch"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

func (k StreamKind) valid() bool { return k >= KindControl && k <= KindFetch }

// controlStreamID is the yamux ID of the first stream a yamux client opens.
const controlStreamID = 1

// Peer identifies the remote node by its verified certificate.
type Peer struct {
	Addr       net.Addr
	CommonName string
	DNSNames   []string
	IPs        []net.IP
	Cert       *x509.Certificate // the leaf; it chains to our CA
}

func (p Peer) String() string {
	return fmt.Sprintf("%s (%s)", p.CommonName, p.Addr)
}

// Session is one authenticated connection to a peer, multiplexed into
// streams. The dialing side opens streams, the listening side accepts them;
// the first stream is always the control stream. All methods are safe for
// concurrent use.
type Session struct {
	mux         *yamux.Session
	peer        Peer
	dialer      bool
	kindTimeout time.Duration
	frameBytes  int           // largest frame Stream.Write sends
	wire        *countingConn // the TCP connection, counted

	openMu sync.Mutex // serialises OpenStream so stream IDs follow call order
	opened int        // streams opened; guarded by openMu

	acceptMu sync.Mutex // serialises AcceptStream so the control check sees streams in order
	accepted int        // streams accepted; guarded by acceptMu
}

// newSession runs yamux over conn, whose handshake has completed. The
// session owns conn from here on.
func newSession(conn *tls.Conn, cfg Config, log *slog.Logger, dialer bool) (*Session, error) {
	state := conn.ConnectionState()
	if len(state.PeerCertificates) == 0 {
		// Both sides require a verified certificate; this is a bug.
		return nil, errors.New("new session: handshake left no peer certificate")
	}
	leaf := state.PeerCertificates[0]
	s := &Session{
		peer: Peer{
			Addr:       conn.RemoteAddr(),
			CommonName: leaf.Subject.CommonName,
			DNSNames:   leaf.DNSNames,
			IPs:        leaf.IPAddresses,
			Cert:       leaf,
		},
		dialer:      dialer,
		kindTimeout: cfg.HandshakeTimeout,
		frameBytes:  cfg.frameBytes(),
	}
	newMux := yamux.Server
	if dialer {
		newMux = yamux.Client
	}
	mux, err := newMux(conn, cfg.yamuxConfig(log))
	if err != nil {
		return nil, fmt.Errorf("new session: %w", err)
	}
	s.mux = mux
	return s, nil
}

// Peer returns the identity of the remote node.
func (s *Session) Peer() Peer { return s.peer }

// Done is closed when the session has ended, by Close or a failure.
func (s *Session) Done() <-chan struct{} { return s.mux.CloseChan() }

// Close ends the session, its streams and its connection, and unblocks
// every AcceptStream, Read and Write. It is idempotent.
func (s *Session) Close() error { return s.mux.Close() }

// OpenStream opens a stream of the given kind. Only the dialing side opens
// streams (else ErrWrongSide), and the first stream must be KindControl and
// the only one (else ErrStreamKind). ctx bounds writing the kind byte. If
// opening the control stream fails the session is of no further use.
func (s *Session) OpenStream(ctx context.Context, kind StreamKind) (*Stream, error) {
	if !s.dialer {
		return nil, fmt.Errorf("open %v stream: %w", kind, ErrWrongSide)
	}
	if !kind.valid() {
		return nil, fmt.Errorf("open stream: %w: %v", ErrStreamKind, kind)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open %v stream: %w", kind, err)
	}
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if first := s.opened == 0; first != (kind == KindControl) {
		return nil, fmt.Errorf("open %v stream: %w: the control stream comes first and only once", kind, ErrStreamKind)
	}
	ys, err := s.mux.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("open %v stream: %w", kind, s.closedErr(err))
	}
	s.opened++
	st := &Stream{ys: ys, kind: kind, frameBytes: s.frameBytes}
	err = withDeadline(ctx, s.kindTimeout, ys.SetWriteDeadline, func() error {
		_, err := ys.Write([]byte{byte(kind)})
		return err
	})
	if err != nil {
		_ = ys.Close() // abandoned; the peer sees a stream without a kind
		return nil, fmt.Errorf("open %v stream: %w", kind, s.closedErr(err))
	}
	return st, nil
}

// AcceptStream waits for the dialer's next stream and reads its kind byte,
// within ctx and the handshake timeout. Only the listening side accepts
// (else ErrWrongSide). A first stream that is not KindControl, a later one
// that is, or an unknown kind gives ErrStreamKind; that stream is closed but
// the session is not. After Close it returns an error wrapping net.ErrClosed.
func (s *Session) AcceptStream(ctx context.Context) (*Stream, error) {
	if s.dialer {
		return nil, fmt.Errorf("accept stream: %w", ErrWrongSide)
	}
	s.acceptMu.Lock()
	defer s.acceptMu.Unlock()
	ys, err := s.mux.AcceptStreamWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("accept stream: %w", s.closedErr(err))
	}
	first := s.accepted == 0
	s.accepted++
	var b [1]byte
	err = withDeadline(ctx, s.kindTimeout, ys.SetReadDeadline, func() error {
		_, err := io.ReadFull(ys, b[:])
		return err
	})
	if err != nil {
		_ = ys.Close() // abandoned
		return nil, fmt.Errorf("accept stream %d: read kind: %w", ys.StreamID(), s.closedErr(err))
	}
	kind := StreamKind(b[0])
	switch {
	case !kind.valid():
		err = fmt.Errorf("%w: %v", ErrStreamKind, kind)
	case first && (kind != KindControl || ys.StreamID() != controlStreamID):
		err = fmt.Errorf("%w: first stream %d is %v, want control stream %d", ErrStreamKind, ys.StreamID(), kind, controlStreamID)
	case !first && kind == KindControl:
		err = fmt.Errorf("%w: second control stream %d", ErrStreamKind, ys.StreamID())
	}
	if err != nil {
		_ = ys.Close() // refused
		return nil, fmt.Errorf("accept stream %d: %w", ys.StreamID(), err)
	}
	return &Stream{ys: ys, kind: kind, frameBytes: s.frameBytes}, nil
}

// closedErr marks err as net.ErrClosed once the session has ended, so
// callers can tell shutdown from a stream failure with errors.Is.
func (s *Session) closedErr(err error) error {
	if s.mux.IsClosed() && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("%w: %w", net.ErrClosed, err)
	}
	return err
}

// longAgo is a deadline in the past: it fails pending I/O at once.
var longAgo = time.Unix(1, 0)

// withDeadline runs op with set's deadline at the earlier of now+timeout and
// ctx's deadline; cancelling ctx fails op at once. It returns ctx.Err() if
// ctx ended before op returned, and clears the deadline otherwise.
func withDeadline(ctx context.Context, timeout time.Duration, set func(time.Time) error, op func() error) error {
	d := time.Now().Add(timeout)
	if cd, ok := ctx.Deadline(); ok && cd.Before(d) {
		d = cd
	}
	if err := set(d); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = set(longAgo) })
	err := op()
	if !stop() {
		// The deadline may still be moved to longAgo; the caller
		// must abandon the connection or stream.
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	return set(time.Time{})
}

package pageserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/phaul/phaul/core/pagestore"
)

// Store is where a Server keeps pages. *pagestore.Store implements it; so
// can a forwarder. A Server calls it from one goroutine at a time and never
// keeps data after Add returns, nor buf after Read returns.
type Store interface {
	// Open starts pagemap k for this session and reports whether k has a
	// parent image (the OPEN2 reply).
	Open(k pagestore.Key) (hasParent bool, err error)
	// Add records nrPages pages at vaddr with pagemap flags; data holds
	// nrPages*PageSize bytes iff flags has FlagPresent, else it is nil.
	Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error
	// Read fills buf (whole pages) from vaddr and fails with an error
	// wrapping pagestore.ErrNotFound or pagestore.ErrNoContent if any of
	// those pages was never added or has no content there.
	Read(k pagestore.Key, vaddr uint64, buf []byte) error
	// Commit makes everything added so far durable as CRIU images.
	Commit() error
}

// Config configures a Server.
type Config struct {
	// Store receives the pages; required. The caller owns it.
	Store Store
	// ImagesDir is where PARENT looks for parent/pagemap-*.img, as CRIU
	// does; "" answers 0 (no parent).
	ImagesDir string
	// TLS, if set, wraps every accepted connection: it must demand TLS 1.3
	// and RequireAndVerifyClientCert. ServeConn never uses it.
	TLS *tls.Config
	// HandshakeTimeout bounds the TLS handshake plus the first header.
	HandshakeTimeout time.Duration
	// IdleTimeout ends a session whose peer makes no progress (no byte
	// read or written) for this long; 0: never.
	IdleTimeout time.Duration
	// OnSession, if set, is called once per session that took the slot,
	// after its connection closed, with its stats and error (nil after a
	// successful CLOSE). It runs on the session's goroutine.
	OnSession func(Stats, error)
	// Logger receives one line per refused connection and per session;
	// nil: discard.
	Logger *slog.Logger
}

// DefaultConfig returns a Config without a Store.
func DefaultConfig() Config {
	return Config{HandshakeTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute}
}

// Validate reports every problem of c.
func (c Config) Validate() error {
	var errs []error
	if c.Store == nil {
		errs = append(errs, errors.New("no Store"))
	}
	if c.HandshakeTimeout <= 0 {
		errs = append(errs, fmt.Errorf("HandshakeTimeout %v: want > 0", c.HandshakeTimeout))
	}
	if c.IdleTimeout < 0 {
		errs = append(errs, fmt.Errorf("IdleTimeout %v: want >= 0", c.IdleTimeout))
	}
	if c.TLS != nil && (c.TLS.MinVersion < tls.VersionTLS13 || c.TLS.ClientAuth != tls.RequireAndVerifyClientCert) {
		errs = append(errs, errors.New("TLS must require TLS 1.3 and RequireAndVerifyClientCert"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pageserver config: %w", err)
	}
	return nil
}

// Stats describes one session.
type Stats struct {
	Peer      string
	Ranges    uint64 // ranges stored (ADD, ADD_F, HOLE)
	PagesIn   uint64 // pages received with data
	Gets      uint64 // GETs answered
	PagesOut  uint64 // pages sent in GET replies
	Committed bool   // the store was committed at CLOSE
	Duration  time.Duration
}

// maxPending bounds connections that have not yet sent their first header
// (each holds a goroutine and a read buffer for up to HandshakeTimeout).
const maxPending = 64

// Server serves CRIU's page-server protocol (spec.md) into one Store: one
// session at a time, so one Server per images dir. Its methods are safe for
// concurrent use.
type Server struct {
	cfg     Config
	log     *slog.Logger
	pending chan struct{} // one token per connection before its first header

	mu     sync.Mutex
	active string // guarded by mu: the peer holding the session slot, "" if none
}

// NewServer validates cfg and returns a Server.
func NewServer(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: log, pending: make(chan struct{}, maxPending)}, nil
}

// Serve accepts connections on ln and serves each on its own goroutine
// (wrapped in Config.TLS if set) until ctx ends or Accept fails. It closes
// ln when ctx ends and returns only after every connection it accepted has
// been closed: nil when ctx ended, else Accept's error.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("page server accept: %w", err)
		}
		select {
		case s.pending <- struct{}{}:
		default:
			s.refuse(nc.RemoteAddr().String(), "pending", fmt.Errorf("%w: %d connections without a first header yet", ErrBusy, maxPending))
			nc.Close()
			continue
		}
		wg.Go(func() {
			held := true
			release := func() {
				if held {
					held = false
					<-s.pending
				}
			}
			defer release()
			s.serve(ctx, nc, s.cfg.TLS, release)
		})
	}
}

// ServeConn serves one session on nc, which must not be wrapped in TLS by
// the Server (it ignores Config.TLS: wrap nc yourself), and closes nc. It
// returns the session's error: nil after a successful CLOSE, ErrBusy if
// another session holds the slot.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	return s.serve(ctx, nc, nil, func() {})
}

// serve runs one connection: TLS handshake, first header, session slot,
// session. release is called once the first header has been read.
func (s *Server) serve(ctx context.Context, raw net.Conn, tlsConf *tls.Config, release func()) error {
	peer := raw.RemoteAddr().String()
	ic := &idleConn{Conn: raw}
	var nc net.Conn = ic
	defer func() { nc.Close() }()
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	raw.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	if tlsConf != nil {
		tc := tls.Server(ic, tlsConf)
		nc = tc
		if err := tc.HandshakeContext(ctx); err != nil {
			s.refuse(peer, tlsRefusal(err), err)
			return err
		}
		st := tc.ConnectionState()
		s.log.Debug("tls handshake", "peer", peer, "version", tls.VersionName(st.Version),
			"cipher", tls.CipherSuiteName(st.CipherSuite), "client", st.PeerCertificates[0].Subject.CommonName)
	}
	sess := newSession(s, nc)
	first, err := sess.readFirst()
	release()
	if err != nil {
		s.refuse(peer, "first header", err)
		return err
	}
	if !s.acquire(peer) {
		err := fmt.Errorf("%w: %s", ErrBusy, s.activePeer())
		s.refuse(peer, "busy", err)
		return err
	}
	raw.SetDeadline(time.Time{})
	ic.idle = s.cfg.IdleTimeout

	start := time.Now()
	err = sess.run(first)
	// Free the slot before the peer can see the close: a client that
	// reconnects at once must not find its own old session busy.
	s.releaseSlot()
	nc.Close()
	st := sess.stats
	st.Peer, st.Duration = peer, time.Since(start)
	attrs := []any{"peer", peer, "ranges", st.Ranges, "pages", st.PagesIn, "gets", st.Gets,
		"pages_out", st.PagesOut, "committed", st.Committed, "dur", st.Duration}
	if err != nil {
		s.log.Warn("session failed", append(attrs, "err", err)...)
	} else {
		s.log.Info("session done", attrs...)
	}
	if s.cfg.OnSession != nil {
		s.cfg.OnSession(st, err)
	}
	return err
}

// refuse logs a connection dropped before its session started.
func (s *Server) refuse(peer, stage string, err error) {
	s.log.Warn("connection refused", "peer", peer, "stage", stage, "err", err)
}

func (s *Server) acquire(peer string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.active != "" {
		return false
	}
	s.active = peer
	return true
}

func (s *Server) releaseSlot() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.active = ""
}

func (s *Server) activePeer() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return "session of " + s.active + " active"
}

// idleConn renews the deadline before every Read and Write while idle > 0,
// so a session fails only when its peer makes no progress for idle.
type idleConn struct {
	net.Conn
	idle time.Duration // owned by the session's goroutine
}

func (c *idleConn) Read(p []byte) (int, error) {
	if c.idle > 0 {
		c.Conn.SetReadDeadline(time.Now().Add(c.idle))
	}
	return c.Conn.Read(p)
}

func (c *idleConn) Write(p []byte) (int, error) {
	if c.idle > 0 {
		c.Conn.SetWriteDeadline(time.Now().Add(c.idle))
	}
	return c.Conn.Write(p)
}

// tlsRefusal names the stage of a failed server handshake for the log.
func tlsRefusal(err error) string {
	var (
		verify *tls.CertificateVerificationError
		record tls.RecordHeaderError
		netErr net.Error
		opErr  *net.OpError
	)
	switch {
	case errors.As(err, &verify):
		return "tls: client certificate not trusted"
	case errors.As(err, &record):
		return "tls: not TLS"
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		return "tls: peer refused the handshake" // crypto/tls's Op for a received alert
	case errors.As(err, &netErr) && netErr.Timeout():
		return "tls: handshake timeout"
	case errors.Is(err, io.EOF):
		return "tls: peer hung up"
	}
	return "tls: handshake failed"
}

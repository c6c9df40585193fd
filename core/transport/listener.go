package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Bounds on the pause after a failed accept (EMFILE and the like), which
// would otherwise spin.
const (
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
)

// Listener accepts authenticated sessions. It owns a goroutine that accepts
// TCP connections and one per handshake in progress (at most
// Config.MaxHandshakes), so a slow or silent peer delays no one else. A peer
// that fails its handshake, for any reason including an untrusted
// certificate, garbage or silence past Config.HandshakeTimeout, is logged at
// warn level with its address and the reason, and dropped.
type Listener struct {
	ln      net.Listener
	cfg     Config
	log     *slog.Logger
	tlsConf *tls.Config

	ready  chan *Session   // handshaken sessions, handed to Accept
	ctx    context.Context // done once the listener is closing
	cancel context.CancelFunc
	wg     sync.WaitGroup // the accept loop, the closer and each handshake

	closeErr error // from ln.Close; written by the closer before wg.Done
}

// Listen listens on addr ("HOST:PORT"; port 0 picks one, see Addr) and
// starts accepting. The listener lives until Close or until ctx ends; Close
// must be called in either case to wait for its goroutines.
func Listen(ctx context.Context, addr string, cfg Config) (*Listener, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	lc := net.ListenConfig{Control: cfg.Control}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	l := &Listener{
		ln:      ln,
		cfg:     cfg,
		log:     cfg.logger(),
		tlsConf: cfg.Identity.serverTLS(cfg.Peers),
		ready:   make(chan *Session),
	}
	l.ctx, l.cancel = context.WithCancel(ctx)
	l.wg.Add(2)
	go func() {
		defer l.wg.Done()
		<-l.ctx.Done()
		l.closeErr = ln.Close() // unblocks acceptLoop
	}()
	go func() {
		defer l.wg.Done()
		l.acceptLoop()
	}()
	return l, nil
}

// Addr returns the address the listener is bound to.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Accept returns the next authenticated session, whose peer presented a
// certificate from our CA. It returns ctx's error when ctx ends and an
// error wrapping net.ErrClosed once the listener is closed. The caller owns
// the session and must Close it.
func (l *Listener) Accept(ctx context.Context) (*Session, error) {
	select {
	case s := <-l.ready:
		return s, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("accept: %w", ctx.Err())
	case <-l.ctx.Done():
		return nil, fmt.Errorf("accept: %w", net.ErrClosed)
	}
}

// Close stops listening, aborts handshakes in progress, closes sessions not
// yet accepted, unblocks Accept and waits for the listener's goroutines.
// Sessions already accepted are unaffected. Close is idempotent.
func (l *Listener) Close() error {
	l.cancel()
	l.wg.Wait()
	if l.closeErr != nil && !errors.Is(l.closeErr, net.ErrClosed) {
		return fmt.Errorf("close listener: %w", l.closeErr)
	}
	return nil
}

// acceptLoop accepts connections and starts a handshake for each until the
// listener closes. Handshakes in progress are bounded (Config.MaxHandshakes
// in all, Config.MaxHandshakesPerAddr from one address): a new connection
// beyond a bound drops the oldest handshake in progress under it, so
// connections that never speak cannot keep a real peer waiting.
func (l *Listener) acceptLoop() {
	hs := &handshakes{}
	var backoff time.Duration
	for {
		raw, err := l.ln.Accept()
		if err != nil {
			if l.ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, minAcceptBackoff), maxAcceptBackoff)
			l.log.Warn("accept failed", "err", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-l.ctx.Done():
				t.Stop()
				return
			}
			continue
		}
		backoff = 0
		h := hs.add(raw, l.cfg.MaxHandshakes, l.cfg.MaxHandshakesPerAddr)
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer hs.remove(h)
			l.handshake(raw, h)
		}()
	}
}

// handshakes are the server handshakes in progress.
type handshakes struct {
	mu  sync.Mutex
	all []*pending // oldest first
}

type pending struct {
	conn    net.Conn
	host    string
	dropped atomic.Bool // closed to make room: its handshake logs why
}

// add records conn, first dropping the oldest handshake of its address if
// that address has perAddr already, else the oldest of all if there are
// max.
func (hs *handshakes) add(conn net.Conn, max, perAddr int) *pending {
	host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
	p := &pending{conn: conn, host: host}
	hs.mu.Lock()
	defer hs.mu.Unlock()
	n := 0
	oldestHere := -1
	for i, o := range hs.all {
		if o.host == host {
			if oldestHere < 0 {
				oldestHere = i
			}
			n++
		}
	}
	drop := -1
	switch {
	case perAddr > 0 && n >= perAddr:
		drop = oldestHere
	case len(hs.all) >= max:
		drop = 0
	}
	if drop >= 0 {
		o := hs.all[drop]
		hs.all = append(hs.all[:drop], hs.all[drop+1:]...)
		o.dropped.Store(true)
		_ = o.conn.Close() // its handshake fails at once, and logs it
	}
	hs.all = append(hs.all, p)
	return p
}

// remove forgets p once its handshake ended (a dropped one is gone).
func (hs *handshakes) remove(p *pending) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if i := slices.Index(hs.all, p); i >= 0 {
		hs.all = append(hs.all[:i], hs.all[i+1:]...)
	}
}

// handshake authenticates raw and hands the session to Accept, or logs why
// the peer was refused and closes raw.
func (l *Listener) handshake(tcp net.Conn, h *pending) {
	log := l.log.With("peer", tcp.RemoteAddr().String())
	raw := &countingConn{Conn: tcp}
	conn := tls.Server(raw, l.tlsConf)
	err := withDeadline(l.ctx, l.cfg.HandshakeTimeout, raw.SetDeadline, func() error {
		if err := conn.HandshakeContext(l.ctx); err != nil {
			return err
		}
		if err := checkALPN(conn); err != nil {
			return err
		}
		_, err := conn.Write([]byte{prefaceAccepted})
		return err
	})
	if err != nil {
		_ = raw.Close() // refused; nothing more to say to this peer
		switch {
		case h.dropped.Load():
			log.Warn("peer refused", "reason", "handshake dropped for a newer connection")
		case l.ctx.Err() == nil:
			log.Warn("peer refused", "reason", refusalReason(err), "err", err)
		}
		return
	}
	s, err := newSession(conn, l.cfg, log, false)
	if s != nil {
		s.wire = raw
	}
	if err != nil {
		_ = raw.Close()
		log.Warn("peer refused", "reason", "session setup", "err", err)
		return
	}
	log.Info("peer authenticated", "name", s.peer.CommonName, "serial", SerialString(s.peer.Cert.SerialNumber))
	select {
	case l.ready <- s:
	case <-l.ctx.Done():
		_ = s.Close()
	}
}

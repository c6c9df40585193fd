package phaul

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
)

// Post-copy recovery, as QEMU's postcopy recovery does it: once the
// destination's tree runs, a lost connection ends neither side. The
// destination's faulting threads wait (the fetch clients keep their
// requests), the source keeps its held tree and dials again with a hello
// that names the migration and asks to resume; the destination attaches
// the new session's fetch streams (the requests in flight are asked again)
// and its control stream, on which PostcopyDone then goes.

// errResumed ends the session of a resumed post-copy once that post-copy
// is over: the handler has nothing else to do with it.
var errResumed = errors.New("post-copy resumed on this session")

// postcopyLink is the control connection a post-copy reports its end on;
// a source that reconnects replaces it.
type postcopyLink struct {
	peer string // the source's certificate's digest (certDigest): only it may resume

	mu        sync.Mutex
	ctl       *wire.Conn
	changed   chan struct{} // closed when ctl is replaced
	resumable bool          // committed, PostcopyDone not yet delivered for sure
	final     *wire.Message // PostcopyDone, once the fill ended
	done      chan struct{} // closed when the post-copy ended here
}

func newPostcopyLink(ctl *wire.Conn, peer transport.Peer) *postcopyLink {
	return &postcopyLink{ctl: ctl, peer: certDigest(peer), changed: make(chan struct{}), done: make(chan struct{})}
}

// certDigest names a peer by its certificate's SHA-256 ("" without one).
func certDigest(peer transport.Peer) string {
	if peer.Cert == nil {
		return ""
	}
	d := sha256.Sum256(peer.Cert.Raw)
	return hex.EncodeToString(d[:])
}

// setResumable opens (or closes) the link to a reconnecting source.
func (l *postcopyLink) setResumable(on bool) {
	l.mu.Lock()
	l.resumable = on
	l.mu.Unlock()
}

// send delivers m on the current control connection; if that fails it
// waits up to timeout for a reconnect and sends it there. A source that
// reconnects later gets it again (replace).
func (l *postcopyLink) send(m *wire.Message, timeout time.Duration) error {
	l.mu.Lock()
	l.final = m
	l.mu.Unlock()
	deadline := time.Now().Add(timeout)
	for {
		l.mu.Lock()
		ctl, changed := l.ctl, l.changed
		l.mu.Unlock()
		err := errors.New("no source connected")
		if ctl != nil {
			err = ctl.Send(m)
		}
		if err == nil {
			return nil
		}
		wait := time.Until(deadline)
		if wait <= 0 {
			return fmt.Errorf("source gone for %v: %w", timeout, err)
		}
		t := time.NewTimer(wait)
		select {
		case <-changed:
		case <-t.C:
		}
		t.Stop()
	}
}

// replace makes ctl the link's control connection and resends the end,
// if it is known already.
func (l *postcopyLink) replace(ctl *wire.Conn) error {
	l.mu.Lock()
	l.ctl = ctl
	close(l.changed)
	l.changed = make(chan struct{})
	final := l.final
	l.mu.Unlock()
	if final != nil {
		return ctl.Send(final)
	}
	return nil
}

// end marks the post-copy over.
func (l *postcopyLink) end() {
	l.setResumable(false)
	close(l.done)
}

// resume attaches a reconnecting source's session to its post-copy: the
// fetch streams it opens replace the lost ones and its control stream
// carries PostcopyDone. It returns errResumed once the post-copy is over,
// or why it was refused.
func (s *Server) resume(ctx context.Context, sess *transport.Session, ctl *wire.Conn, h *wire.Hello, version uint32, log *slog.Logger) error {
	refuse := func(reason string) error {
		ctl.Send(&wire.Message{Body: &wire.Message_HelloReply{HelloReply: &wire.HelloReply{Reason: reason}}})
		return errors.New(reason)
	}
	s.mu.Lock()
	in := s.active[h.GetMigrationId()]
	dropped := s.dropped.has(h.GetMigrationId())
	s.mu.Unlock()
	if in == nil && dropped {
		reason := fmt.Sprintf("migration %s was dropped here before COMMIT: the source's copy is the only one", h.GetMigrationId())
		ctl.Send(&wire.Message{Body: &wire.Message_HelloReply{HelloReply: &wire.HelloReply{Reason: reason, NotCommitted: true}}})
		return errors.New(reason)
	}
	if in == nil || in.link == nil {
		return refuse(fmt.Sprintf("no post-copy of migration %s here", h.GetMigrationId()))
	}
	in.link.mu.Lock()
	resumable := in.link.resumable
	in.link.mu.Unlock()
	switch {
	case !resumable:
		return refuse(fmt.Sprintf("migration %s is not in post-copy", in.id))
	case in.link.peer == "" || certDigest(sess.Peer()) != in.link.peer:
		return refuse(fmt.Sprintf("migration %s belongs to another source", in.id))
	}
	reply := &wire.HelloReply{Version: version, Accepted: true}
	if err := ctl.Send(&wire.Message{Body: &wire.Message_HelloReply{HelloReply: reply}}); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	first, err := sess.AcceptStream(ctx)
	if err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	st, err := acceptFetch(ctx, sess, first)
	if err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	if err := in.lazy.attachFetch(st); err != nil {
		st[0].Close()
		st[1].Close()
		return fmt.Errorf("resume: %w", err)
	}
	// The relays own st now (lazyRestore.relays): the handler's
	// fetchStreams stay the first session's.
	if err := in.link.replace(ctl); err != nil {
		return fmt.Errorf("resume: %w", err)
	}
	in.log.Info("post-copy resumed on a new connection", "peer", sess.Peer().String())
	select {
	case <-in.link.done:
	case <-sess.Done():
	case <-ctx.Done():
	}
	return errResumed
}

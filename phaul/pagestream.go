package phaul

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/pageserver"
)

// pageStream is a migration's page path on the source: CRIU dumps into a
// page server on one end of a socket pair (criuEnd is the other, handed to
// CRIU as its page-server socket: no listening socket another local process
// could reach first), and the server forwards every page over the yamux
// streams (lanes) to the destination's page store.
type pageStream struct {
	criuEnd *os.File
	local   net.Conn
	streams []*transport.Stream
	fw      *pageserver.Forwarder
	done    chan error
	serve   func()
	started bool
}

// startPages opens the page streams and the page server CRIU will dump
// into; store wraps the forwarder into what that server writes to.
func (s *source) startPages(ctx context.Context, store func(*pageserver.Forwarder) pageserver.Store) (p *pageStream, err error) {
	p = &pageStream{done: make(chan error, 1)}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	var lanes []io.ReadWriter
	for range max(s.cfg.PageStreams, 1) {
		st, err := s.sess.OpenStream(ctx, transport.KindPages)
		if err != nil {
			return nil, fmt.Errorf("pages stream: %w", err)
		}
		p.streams = append(p.streams, st)
		lanes = append(lanes, ctxStream{ctx, st})
	}
	if p.fw, err = pageserver.NewForwarder(pageserver.ForwardConfig{Compress: s.cfg.Compress}, lanes...); err != nil {
		return nil, err
	}
	if p.local, p.criuEnd, err = linux.StreamPair(); err != nil {
		return nil, err
	}
	pcfg := pageserver.DefaultConfig()
	pcfg.Store, pcfg.Logger = store(p.fw), s.log
	srv, err := pageserver.NewServer(pcfg)
	if err != nil {
		return nil, err
	}
	p.serve = func() {
		go func() { p.done <- srv.ServeConn(ctx, p.local) }() // owned by p; finish waits
	}
	return p, nil
}

// start serves CRIU's page-server session; call it right before the dump
// (the session's handshake timeout runs from here, and pre-copy rounds
// come first).
func (p *pageStream) start() {
	p.serve()
	p.started = true
}

// finish ends the page path after the dump: CRIU has closed its end (or
// died); closing ours lets the server see EOF.
func (p *pageStream) finish() (pageserver.ForwardStats, error) {
	p.criuEnd.Close()
	var err error
	if p.started {
		err = <-p.done
	}
	p.close()
	return p.fw.Stats(), err
}

// close releases what startPages set up: the streams first, so that a
// forwarder lane blocked writing returns.
func (p *pageStream) close() {
	if p.criuEnd != nil {
		p.criuEnd.Close()
	}
	if p.local != nil {
		p.local.Close()
	}
	for _, st := range p.streams {
		st.Close()
	}
	if p.fw != nil {
		p.fw.Close()
	}
}

// ctxStream is a stream whose writes fail once ctx is done: a write
// deadline does not wake a write that waits for the connection (slow link),
// so every write checks ctx first.
type ctxStream struct {
	ctx context.Context
	*transport.Stream
}

func (c ctxStream) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.Stream.Write(p)
}

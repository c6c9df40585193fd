package phaul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/lazy"
	"github.com/phaul/phaul/pageserver"
)

// The lazy-pages helper: a destination's lazy-pages daemon for one restore
// runs in a process of its own (phaul lazy-pages, started by the service
// in a session and cgroup of its own), so that the restored tree's
// userfaultfds outlive the service. A service killed while the tree fills
// then loses nothing: the helper goes on serving faults from the images;
// threads faulting on pages still at the source wait (its fetch clients
// keep their requests) until a restarted service relays the source's new
// fetch streams to it (lazyctl.go).

// LazyHelperConfig configures RunLazyHelper.
type LazyHelperConfig struct {
	// Dir is the migration's directory: the restore's work dir, where the
	// helper listens (lazy-pages.socket for CRIU, lazyCtlSocket for the
	// service) and leaves lazyResultFile.
	Dir string
	// ImagesDir holds the images the restore reads.
	ImagesDir string
	// Postcopy: the pages the images leave without content are at the
	// source, fetched through the service; RecoverTimeout is how long
	// their requests wait for a service to relay a fetch stream.
	Postcopy       bool
	RecoverTimeout time.Duration
	Logger         *slog.Logger
	// Ready receives "ok\n" once CRIU may connect, or why not; then it is
	// closed.
	Ready io.WriteCloser
}

// lazyHelper is the helper's state.
type lazyHelper struct {
	d      *lazy.Daemon
	remote *remoteSource // post-copy; nil otherwise
	fetch  *fetchClients
	log    *slog.Logger
	cancel context.CancelFunc // ends Serve

	mu        sync.Mutex
	ended     chan struct{} // closed once result is set
	result    lazyReply
	root      int            // the restored root, once parked
	rootStart uint64         // its start time
	busy      sync.WaitGroup // control streams being answered
}

// RunLazyHelper runs a lazy-pages daemon for the restore in cfg.Dir until
// every lazy page is in place (nil) or ctx ends. If the daemon fails it
// keeps the tree's userfaultfds (a missing page would read as zeros once
// they close) until ctx ends: the service kills the tree first.
func RunLazyHelper(ctx context.Context, cfg LazyHelperConfig) error {
	log := discardIfNil(cfg.Logger)
	ready := func(err error) {
		if cfg.Ready == nil {
			return
		}
		msg := "ok\n"
		if err != nil {
			msg = err.Error() + "\n"
		}
		cfg.Ready.Write([]byte(msg))
		cfg.Ready.Close()
		cfg.Ready = nil
	}
	h, ln, err := startLazyHelper(cfg, log)
	if err != nil {
		ready(err)
		return err
	}
	defer ln.Close()
	serveCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	h.cancel = cancel
	go h.accept(ln) // ends with ln
	ready(nil)
	err = h.d.Serve(serveCtx)
	h.end(cfg.Dir, err)
	if err == nil {
		h.d.Close()
		h.fetch.close()
		ln.Close() // no new requests: the result file answers them
		h.drain(2 * time.Second)
		return nil
	}
	log.Error("lazy-pages daemon failed: the tree's userfaultfds stay open until the tree is gone", "err", err)
	h.waitTreeGone(ctx)
	h.d.Close()
	h.fetch.close()
	return err
}

// startLazyHelper marks the images, starts the daemon's listener and the
// control listener.
func startLazyHelper(cfg LazyHelperConfig, log *slog.Logger) (*lazyHelper, net.Listener, error) {
	h := &lazyHelper{log: log, ended: make(chan struct{})}
	if cfg.Postcopy {
		spans, pages, err := remoteSpans(cfg.ImagesDir)
		if err != nil {
			return nil, nil, fmt.Errorf("lazy restore: pages at the source: %w", err)
		}
		h.fetch = &fetchClients{faults: pageserver.NewLostFetchClient(cfg.RecoverTimeout),
			fill: pageserver.NewLostFetchClient(cfg.RecoverTimeout)}
		h.remote = &remoteSource{fetch: h.fetch, remote: spans}
		log.Info("post-copy: pages at the source", "pages", pages, "tasks", len(spans))
	}
	// phaul's store writes every page present; mark those CRIU may leave
	// to the daemon, as its own dump would.
	marked, err := lazy.MarkImages(cfg.ImagesDir)
	if err != nil {
		h.fetch.close()
		return nil, nil, fmt.Errorf("lazy restore: %w", err)
	}
	log.Info("lazy restore", "lazy_pages", marked)
	src := lazy.NewImageSource(cfg.ImagesDir)
	dcfg := lazy.DefaultConfig()
	dcfg.WorkDir, dcfg.ImagesDir, dcfg.Source, dcfg.Logger = cfg.Dir, cfg.ImagesDir, src, log
	if h.remote != nil {
		h.remote.local = src
		dcfg.Source = h.remote
	}
	if h.d, err = lazy.Listen(dcfg); err != nil {
		src.Close()
		h.fetch.close()
		return nil, nil, fmt.Errorf("lazy restore: %w", err)
	}
	ln, err := lazy.ListenIn(cfg.Dir, lazyCtlSocket)
	if err != nil {
		h.d.Close()
		h.fetch.close()
		return nil, nil, fmt.Errorf("lazy restore: control socket: %w", err)
	}
	return h, ln, nil
}

// end records Serve's result, in memory and in dir (for a service that
// connects after the helper exited).
func (h *lazyHelper) end(dir string, err error) {
	r := lazyReply{Ended: true, Stats: h.d.Stats()}
	if err != nil {
		r.Err = err.Error()
	}
	if h.remote != nil {
		r.RemotePages = h.remote.pages.Load()
	}
	h.mu.Lock()
	h.result = r
	h.mu.Unlock()
	close(h.ended)
	if b, jerr := json.Marshal(r); jerr == nil {
		if werr := writeAtomic(filepath.Join(dir, lazyResultFile), b); werr != nil {
			h.log.Error("lazy result", "err", werr)
		}
	}
	h.log.Info("lazy-pages daemon ended", "err", err, "stats", fmt.Sprintf("%+v", r.Stats))
}

// drain waits, at most timeout, for the control streams being answered.
func (h *lazyHelper) drain(timeout time.Duration) {
	done := make(chan struct{})
	go func() { h.busy.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
	}
}

// accept serves each connection a service makes.
func (h *lazyHelper) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go h.serveConn(c)
	}
}

// serveConn dispatches one connection on its first byte.
func (h *lazyHelper) serveConn(st net.Conn) {
	var kind [1]byte
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(st, kind[:]); err != nil {
		st.Close()
		return
	}
	switch kind[0] {
	case streamFetch:
		var role [1]byte
		if _, err := io.ReadFull(st, role[:]); err != nil || h.fetch == nil || role[0] > byte(pageserver.FetchFill) {
			h.log.Warn("fetch stream refused", "role", role[0], "postcopy", h.fetch != nil, "err", err)
			st.Close()
			return
		}
		st.SetReadDeadline(time.Time{})
		c := h.fetch.faults
		if pageserver.FetchRole(role[0]) == pageserver.FetchFill {
			c = h.fetch.fill
		}
		if err := c.Attach(st); err != nil {
			h.log.Warn("fetch stream", "role", pageserver.FetchRole(role[0]), "err", err)
		}
	case streamControl:
		h.busy.Add(1)
		defer h.busy.Done()
		defer st.Close()
		q, err := decodeLazyRequest(st)
		if err != nil {
			writeJSONLine(st, lazyReply{Err: err.Error()})
			return
		}
		st.SetReadDeadline(time.Time{})
		writeJSONLine(st, h.do(q))
	default:
		st.Close()
	}
}

// do runs one control request.
func (h *lazyHelper) do(q lazyRequest) lazyReply {
	switch q.Op {
	case "park":
		if err := h.d.Park(); err != nil {
			return lazyReply{Err: err.Error()}
		}
		if q.Root > 0 {
			if st, err := linux.ReadProcessStat(q.Root); err == nil {
				h.mu.Lock()
				h.root, h.rootStart = q.Root, st.StartTicks
				h.mu.Unlock()
			}
		}
		return lazyReply{}
	case "status":
		select {
		case <-h.ended:
			return h.res()
		default:
			return lazyReply{Stats: h.d.Stats()}
		}
	case "wait":
		<-h.ended
		return h.res()
	case "detach":
		if err := h.d.Detach(); err != nil {
			h.cancel()
			<-h.ended
			r := h.res()
			r.Err = errors.Join(err, r.error()).Error()
			return r
		}
		t := time.NewTimer(time.Duration(q.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		select {
		case <-h.ended:
			return h.res()
		case <-t.C:
			h.cancel()
			<-h.ended
			r := h.res()
			r.Err = fmt.Sprintf("fill took longer than %v: %v", time.Duration(q.TimeoutMS)*time.Millisecond, r.Err)
			return r
		}
	}
	return lazyReply{Err: "unknown op " + q.Op}
}

func (h *lazyHelper) res() lazyReply {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.result
}

// waitTreeGone returns when ctx ends or the restored root (once parked)
// is gone: the userfaultfds then guard nothing.
func (h *lazyHelper) waitTreeGone(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		root, start := h.root, h.rootStart
		h.mu.Unlock()
		if root > 0 && !processAlive(root, start) {
			h.log.Info("the restored tree is gone: the helper ends")
			return
		}
	}
}

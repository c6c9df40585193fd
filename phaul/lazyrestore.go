package phaul

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/phaul/phaul/lazy"
)

// lazyRestore is a destination's lazy-pages daemon for one restore: CRIU
// rebuilds the tree without writing the pages the images mark lazy, the
// tree resumes, and the daemon fills them from the migration's images
// (faults first, the rest in the background). The restore then no longer
// writes the tree's memory while the tree is frozen.
type lazyRestore struct {
	d      *lazy.Daemon
	src    *lazy.ImageSource
	remote *remoteSource      // post-copy: pages still at the source; nil otherwise
	cancel context.CancelFunc // ends Serve (abort only)
	done   chan error         // Serve's result; buffered
	t0     time.Time
	log    *slog.Logger
}

// startLazyRestore listens on workDir/lazy-pages.socket and serves the
// restore from the images in imagesDir until every lazy page is in place;
// in post-copy (fetch set) the pages the final set left at the source come
// from there.
func startLazyRestore(workDir, imagesDir string, fetch *fetchClients, log *slog.Logger) (*lazyRestore, error) {
	var remote *remoteSource
	if fetch != nil {
		spans, pages, err := remoteSpans(imagesDir)
		if err != nil {
			return nil, fmt.Errorf("lazy restore: pages at the source: %w", err)
		}
		remote = &remoteSource{fetch: fetch, remote: spans}
		log.Info("post-copy: pages at the source", "pages", pages, "tasks", len(spans))
	}
	// phaul's store writes every page present; mark those CRIU may leave
	// to the daemon, as its own dump would.
	marked, err := lazy.MarkImages(imagesDir)
	if err != nil {
		return nil, fmt.Errorf("lazy restore: %w", err)
	}
	log.Info("lazy restore", "lazy_pages", marked)
	src := lazy.NewImageSource(imagesDir)
	cfg := lazy.DefaultConfig()
	cfg.WorkDir, cfg.ImagesDir, cfg.Source, cfg.Logger = workDir, imagesDir, src, log
	if remote != nil {
		remote.local = src
		cfg.Source = remote
	}
	d, err := lazy.Listen(cfg)
	if err != nil {
		src.Close()
		return nil, fmt.Errorf("lazy restore: %w", err)
	}
	// The daemon's work outlives the migration's context: once the tree
	// runs, its pages must arrive whatever else happens; only abort ends
	// it early.
	ctx, cancel := context.WithCancel(context.Background())
	l := &lazyRestore{d: d, src: src, remote: remote, cancel: cancel, done: make(chan error, 1), t0: time.Now(), log: log}
	go func() { // owned by l: wait or abort collect it
		err := d.Serve(ctx)
		if err != nil && ctx.Err() == nil {
			log.Warn("lazy-pages daemon ended", "err", err)
		}
		l.done <- err
	}()
	return l, nil
}

// park keeps the daemon's end of the restore's connection open in CRIU
// (lazy.Daemon.Park), so that the held tree stays resumable if this
// service dies: whoever resumes it then makes its memory whole first
// (resumeHeld). Called once the restore holds the tree, before PREPARED.
func (l *lazyRestore) park() error { return l.d.Park() }

// failed reports, without waiting, whether the daemon already stopped
// with an error: before the tree resumes, its lazy pages are then not
// coming from it.
func (l *lazyRestore) failed() error {
	err, _ := peek(l.done)
	return err
}

// peek returns, without waiting, the result a one-slot channel holds, and
// leaves it there for its reader; ok is false while there is none.
func peek(ch chan error) (err error, ok bool) {
	select {
	case err = <-ch:
		ch <- err
		return err, true
	default:
		return nil, false
	}
}

// refill makes a held tree's memory whole without the daemon, which
// failed: it closes the userfaultfds the daemon kept and writes every
// lazy page from the images (lazy.Refill), which post-copy cannot (its
// pages are at the source).
func (l *lazyRestore) refill(imagesDir string, root int) error {
	if l.remote != nil {
		return fmt.Errorf("post-copy: the missing pages are at the source")
	}
	l.d.Close()
	pids, err := treeVpids(root)
	if err != nil {
		return err
	}
	n, err := lazy.Refill(context.Background(), imagesDir, pids)
	if err == nil {
		l.log.Warn("lazy-pages daemon failed before the tree ran: its pages were written from the images", "pages", n)
	}
	return err
}

// abort ends the daemon of a restore that failed or was dropped (its tree
// killed first).
func (l *lazyRestore) abort() {
	if l == nil {
		return
	}
	l.cancel()
	<-l.done
	l.d.Close()
	l.src.Close()
}

// detach readies the tree of a restore held in doubt to outlive this
// service (lazy.Daemon.Detach): every lazy page is filled now, within
// timeout, and the daemon ends, leaving a tree that needs no daemon when
// it resumes. An error means the tree misses pages: CRIU kills it if told
// to resume it (the finish marker has nowhere to go), and the
// userfaultfds stay open until this process exits.
func (l *lazyRestore) detach(timeout time.Duration) error {
	t0 := time.Now()
	err := l.d.Detach()
	if err != nil {
		l.cancel()
		<-l.done
	} else {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case err = <-l.done:
		case <-t.C:
			l.cancel()
			err = fmt.Errorf("fill took longer than %v: %w", timeout, <-l.done)
		}
	}
	l.cancel()
	l.src.Close()
	st := l.d.Stats()
	if err != nil {
		return fmt.Errorf("lazy restore: detach: %w (stats %+v)", err, st)
	}
	l.d.Close()
	l.log.Info("lazy restore detached: every page in place", "stats", fmt.Sprintf("%+v", st), "dur", time.Since(t0))
	return nil
}

// wait returns once every lazy page is in place (or the daemon failed),
// logs what the fill took and returns the daemon's account.
func (l *lazyRestore) wait() (lazy.Stats, error) {
	if l == nil {
		return lazy.Stats{}, nil
	}
	err := <-l.done
	l.cancel()
	st := l.d.Stats()
	if err != nil {
		// The tree runs and is the only copy. Closing the userfaultfds
		// would have the missing pages read as zeros: keep them, so a
		// thread that touches one waits, and say so.
		l.log.Error("lazy restore failed: threads touching the missing pages wait; the tree is incomplete",
			"err", err, "stats", fmt.Sprintf("%+v", st))
		return st, fmt.Errorf("lazy restore: %w", err)
	}
	l.d.Close()
	l.src.Close()
	l.log.Info("lazy restore done", "stats", fmt.Sprintf("%+v", st), "dur", time.Since(l.t0))
	return st, nil
}

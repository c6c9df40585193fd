package lazy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/phaul/phaul/core/linux"
)

// Daemon is a lazy-pages daemon for one restore: Listen, start the
// restore, Serve, Close. Stats is safe to call at any time; the other
// methods must not run concurrently with each other.
type Daemon struct {
	cfg Config
	log *slog.Logger
	ln  *net.UnixListener // closed once Serve accepted, or by Close
	// sock is the socket's path, removed with the listener (closeLn).
	sock    string
	closeLn sync.Once
	det     chan int // Detach -> the loop: room for one

	mu       sync.Mutex
	used     bool          // guarded by mu: Serve ran or Close was called
	detached bool          // guarded by mu: Detach was called
	conn     *net.UnixConn // guarded by mu: the restore's connection, once accepted
	parked   bool          // guarded by mu: conn's end is parked in the restore
	kept     []*task       // guarded by mu: userfaultfds a failed Serve left for Close
	closed   bool          // guarded by mu
	st       stats         // guarded by mu
}

// Listen validates cfg and listens on WorkDir/lazy-pages.socket, replacing
// a stale socket there, as CRIU's daemon does. Call it before starting the
// restore: the restore connects once, early, and fails if nobody listens.
func Listen(cfg Config) (*Daemon, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	path := filepath.Join(cfg.WorkDir, SocketName)
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("lazy: remove stale %s: %w", path, err)
		}
	}
	ln, err := ListenIn(cfg.WorkDir, SocketName)
	if err != nil {
		return nil, fmt.Errorf("lazy: listen: %w", err)
	}
	return &Daemon{cfg: cfg, log: cfg.Logger, ln: ln, sock: path, det: make(chan int, 1)}, nil
}

// ListenIn listens on the unix socket name in dir. Only the listening
// side meets sun_path's 107 bytes (CRIU connects to lazy-pages.socket
// relative to its work dir): a longer path is bound through the
// directory's descriptor (/proc/self/fd/N/name), which names the same
// place. Closing the listener does not remove the socket file.
func ListenIn(dir, name string) (*net.UnixListener, error) {
	var ln *net.UnixListener
	err := inDir(dir, name, func(path string) (err error) {
		ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		return err
	})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	return ln, nil
}

// DialIn connects to the unix socket name in dir, as ListenIn binds it.
func DialIn(dir, name string) (*net.UnixConn, error) {
	var c *net.UnixConn
	err := inDir(dir, name, func(path string) (err error) {
		c, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		return err
	})
	return c, err
}

// inDir calls f with a path to name in dir that fits sun_path.
func inDir(dir, name string, f func(path string) error) error {
	path := filepath.Join(dir, name)
	if len(path) <= maxSocketPath {
		return f(path)
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close() // bound or connected by then
	return f(fmt.Sprintf("/proc/self/fd/%d/%s", d.Fd(), name))
}

// closeListener stops listening and removes the socket file, once.
func (d *Daemon) closeListener() {
	d.closeLn.Do(func() {
		d.ln.Close()
		os.Remove(d.sock)
	})
}

// Serve accepts the restore's connection, takes every task's userfaultfd,
// serves faults at once and, after the restore's finish marker, fills the
// remaining lazy pages in the background, nearest to the latest fault
// first, following the tasks' fork, mremap, munmap and madvise. It returns
// nil once every lazy page is in place, having closed the userfaultfds (the
// kernel then serves later faults as for any anonymous memory).
//
// After Detach it fills every missing page at once and returns nil once the
// restore has announced every task and none misses a page, with the
// userfaultfds closed and the restore's connection kept open (see Detach).
//
// On an error, or when ctx ends first, the tasks may still miss pages, which
// would read as zeros once the userfaultfds are closed: Serve leaves them
// open, so a faulting thread waits, and Close closes them. Kill the restored
// tree before Close. Serve runs once.
func (d *Daemon) Serve(ctx context.Context) error {
	d.mu.Lock()
	used := d.used
	d.used = true
	d.mu.Unlock()
	if used {
		return ErrServed
	}
	conn, err := d.accept(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	d.mu.Lock()
	d.conn = conn
	d.mu.Unlock()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	l := newLoop(d)
	ctrlc := make(chan ctrl)
	l.ctrl, l.detC, l.spawn = ctrlc, d.det, g.Go
	// The deadline unblocks control and leaves conn open for park.
	g.Go(func() error { <-gctx.Done(); conn.SetReadDeadline(time.Unix(1, 0)); return nil })
	g.Go(func() error { return d.control(gctx, conn, ctrlc) })
	fctx := context.WithValue(gctx, faultReadKey{}, true)
	for range d.cfg.FaultReads {
		g.Go(func() error { return fetcher(fctx, d.cfg.Source, l.faultReq, l.faultDone) })
	}
	for range bgFetchers {
		g.Go(func() error { return fetcher(gctx, d.cfg.Source, l.bgReq, l.bgDone) })
	}
	g.Go(func() error {
		defer cancel() // done: end the others
		return l.run(gctx)
	})
	err = g.Wait()
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("lazy: serve: %w", err)
	}
	if err == nil && l.detached {
		if err = d.Park(); err != nil {
			err = fmt.Errorf("lazy: detach: %w", err)
		}
	}
	d.finish(l.tasks, err)
	return err
}

// Detach readies the restore of a tree that stays held, rebuilt but not
// resumed (CRIU waits in its post-restore notification, so the finish
// marker is not coming), to outlive the daemon. Serve then fills every
// lazy page still missing at once, without waiting for the marker, and
// returns nil once the restore has announced every task pstree.img lists
// (it does before post-restore) and none misses a page. It closes the
// userfaultfds, which the complete tree no longer needs, and keeps its end
// of the restore's connection open for as long as the restore's end is:
// the restore's finish marker, sent if the tree is resumed later, then
// succeeds, where a closed connection would fail CRIU's restore and have
// it kill the tree. If Serve fails instead, its end closes with it, and
// a tree whose pages are missing can never resume: CRIU kills it at the
// marker. Detach returns at once (an error if pstree.img cannot be read,
// or ErrDetached if called before); wait for Serve's result.
func (d *Daemon) Detach() error {
	n, err := readImage(filepath.Join(d.cfg.ImagesDir, "pstree.img"), readTaskCount)
	if err != nil {
		return fmt.Errorf("lazy: detach: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.detached {
		return ErrDetached
	}
	d.detached = true
	d.det <- n // room for one, and only one is sent
	return nil
}

// Park keeps this end of the restore's connection open for as long as the
// restore's end is, even after this process dies: the restore's finish
// marker, sent when the tree is resumed, then succeeds. Call it once the
// tree must be resumable without this daemon (its pages made whole by
// someone else: Refill); a daemon whose Serve failed must not be parked,
// or a tree missing pages would resume. Safe to call from any goroutine,
// more than once.
func (d *Daemon) Park() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.parked:
		return nil
	case d.conn == nil:
		return errors.New("lazy: park: the restore has not connected")
	}
	if err := park(d.conn); err != nil {
		return fmt.Errorf("lazy: park the restore's connection: %w", err)
	}
	d.parked = true
	return nil
}

// park sends conn's own descriptor over conn to the restore, which never
// reads the socket: the descriptor stays queued at the restore's end, and
// with it this end stays open, until the restore's end closes (it lives in
// CRIU's fdstore until CRIU exits). Closing conn's descriptor afterwards
// only drops this process's reference.
func park(conn *net.UnixConn) error {
	f, err := conn.File()
	if err != nil {
		return err
	}
	defer f.Close()
	return linux.SendFD(conn, []byte{0}, f)
}

// accept takes the restore's one connection and stops listening.
func (d *Daemon) accept(ctx context.Context) (*net.UnixConn, error) {
	stop := context.AfterFunc(ctx, d.closeListener)
	conn, err := d.ln.AcceptUnix()
	stop()
	d.closeListener() // one restore per daemon
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("lazy: accept: %w", ctx.Err())
		}
		return nil, fmt.Errorf("lazy: accept: %w", err)
	}
	return conn, nil
}

// finish closes the userfaultfds Serve no longer needs: all after success,
// else only those of exited tasks.
func (d *Daemon) finish(tasks []*task, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, t := range tasks {
		if err == nil || t.gone {
			t.uffd.Close()
		} else {
			d.kept = append(d.kept, t)
		}
	}
	if err == nil {
		d.st.s.Done = true
		d.log.Info("lazy pages done", "tasks", d.st.s.Tasks, "fault_pages", d.st.s.FaultPages,
			"pushed_pages", d.st.s.PushedPages, "fill", d.st.snapshot().FillTime)
	}
}

// Close stops listening if Serve never ran and closes the userfaultfds a
// failed Serve kept. Call it after Serve returned; later calls return nil.
func (d *Daemon) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed, d.used = true, true
	d.closeListener()
	var errs []error
	for _, t := range d.kept {
		errs = append(errs, t.uffd.Close())
	}
	d.kept = nil
	return errors.Join(errs...)
}

package phaul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/lazy"
)

// lazyRestore is a destination's lazy-pages daemon for one restore, run by
// a helper process (lazyhelper.go) that outlives this service: CRIU
// rebuilds the tree without writing the pages the images mark lazy, the
// tree resumes, and the helper fills them from the migration's images
// (faults first, the rest in the background), or, in post-copy, from the
// source through the fetch streams this service relays to it.
type lazyRestore struct {
	dir      string
	postcopy bool
	pid      int
	start    uint64        // the helper's start time (clock ticks)
	exited   chan struct{} // closed when the helper exited (nil: not our child)
	group    *cgroup.Group // phaul/<id>-lazy; nil if it could not be made
	gone     bool          // adopted after the helper exited: its result file answers
	log      *slog.Logger
	t0       time.Time

	mu     sync.Mutex
	relays []io.Closer // fetch streams relayed to the helper, both ends
}

// lazyGroupName is the cgroup of id's helper: outside the service's own
// (a service stopped by its unit manager must not take it along).
func lazyGroupName(id string) string { return id + "-lazy" }

// startLazyRestore starts the helper for the restore in dir (images in
// imagesDir) and connects to it; CRIU may connect to it once it returns.
// exe is the phaul binary.
func startLazyRestore(exe, id, dir, imagesDir string, postcopy bool, recover time.Duration, log *slog.Logger) (*lazyRestore, error) {
	lf, err := os.OpenFile(filepath.Join(dir, lazyLogFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lazy restore: %w", err)
	}
	defer lf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("lazy restore: %w", err)
	}
	defer r.Close()
	args := []string{"lazy-pages", "--dir", dir, "--images-dir", imagesDir, "--recover-timeout", recover.String()}
	if postcopy {
		args = append(args, "--postcopy")
	}
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = lf, lf, []*os.File{w}
	cmd.Dir = dir // as CRIU's: gc tells a stray one by it
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	w.Close()
	if err != nil {
		return nil, fmt.Errorf("lazy restore: start helper: %w", err)
	}
	l := &lazyRestore{dir: dir, postcopy: postcopy, pid: cmd.Process.Pid, exited: make(chan struct{}), log: log, t0: time.Now()}
	go func() { cmd.Wait(); close(l.exited) }() // reaps it; owned by l
	if st, err := linux.ReadProcessStat(l.pid); err == nil {
		l.start = st.StartTicks
	}
	if g, err := cgroup.Create(lazyGroupName(id)); err != nil {
		log.Warn("lazy-pages helper stays in the service's cgroup", "err", err)
	} else if err := g.Add(l.pid); err != nil {
		log.Warn("lazy-pages helper stays in the service's cgroup", "err", err)
		g.Remove()
	} else {
		l.group = g
	}
	msg, _ := io.ReadAll(io.LimitReader(r, 4096))
	if string(msg) != "ok\n" { // "ok": both its sockets listen
		l.abort()
		return nil, fmt.Errorf("lazy restore: helper: %s", strings.TrimSpace(string(msg)+" "+logTail(filepath.Join(dir, lazyLogFile))))
	}
	log.Info("lazy-pages helper started", "pid", l.pid)
	return l, nil
}

// adoptLazyRestore connects to the helper a previous service started for
// e; one that ended left its result in e's directory.
func adoptLazyRestore(workDir string, e JournalEntry, log *slog.Logger) (*lazyRestore, error) {
	l := &lazyRestore{dir: filepath.Join(workDir, e.ID), postcopy: e.Mode.postcopy(), pid: e.LazyHelper, start: e.LazyHelperStart,
		log: log, t0: time.Now()}
	if g, err := cgroup.Open(lazyGroupName(e.ID)); err == nil {
		l.group = g
	}
	if !l.alive() {
		if _, err := l.result(); err != nil {
			return nil, fmt.Errorf("lazy-pages helper %d is gone and left no result: %w", e.LazyHelper, err)
		}
		l.gone = true
		return l, nil
	}
	return l, l.connect()
}

// connect checks the helper answers on its socket.
func (l *lazyRestore) connect() error {
	c, err := l.dial(streamControl)
	if err != nil {
		return err
	}
	c.Close()
	return nil
}

// dial opens a connection of kind to the helper. Each carries one thing
// (a request, a relayed fetch stream): no multiplexing between service and
// helper, whose pages cross with one copy each way.
func (l *lazyRestore) dial(kind ...byte) (net.Conn, error) {
	c, err := lazy.DialIn(l.dir, lazyCtlSocket)
	if err != nil {
		return nil, fmt.Errorf("lazy restore: connect to helper %d: %w", l.pid, err)
	}
	if _, err := c.Write(kind); err != nil {
		c.Close()
		return nil, fmt.Errorf("lazy restore: helper %d: %w", l.pid, err)
	}
	return c, nil
}

// alive reports whether the helper runs.
func (l *lazyRestore) alive() bool {
	if l.exited != nil {
		select {
		case <-l.exited:
			return false
		default:
			return true
		}
	}
	return processAlive(l.pid, l.start)
}

// processAlive reports whether pid runs and started at start (0: any).
func processAlive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	st, err := linux.ReadProcessStat(pid)
	return err == nil && (start == 0 || st.StartTicks == start) && st.State != 'Z'
}

// request asks the helper; a helper that ended answers from its result
// file.
func (l *lazyRestore) request(q lazyRequest) (lazyReply, error) {
	if l.gone {
		return l.result()
	}
	st, err := l.dial(streamControl)
	if err != nil {
		return l.result()
	}
	defer st.Close()
	var r lazyReply
	if err = writeJSONLine(st, q); err == nil {
		err = readJSONLine(st, maxLazyReply, &r)
	}
	if err != nil {
		// The helper exited: after its daemon ended, or killed.
		return l.result()
	}
	return r, nil
}

// result reads the result a helper that ended left.
func (l *lazyRestore) result() (lazyReply, error) {
	var r lazyReply
	f, err := os.Open(filepath.Join(l.dir, lazyResultFile))
	if err != nil {
		return r, fmt.Errorf("lazy-pages helper %d gone without a result (killed?): the pages it had not placed are lost: %w", l.pid, err)
	}
	defer f.Close()
	if err := json.NewDecoder(io.LimitReader(f, maxLazyReply)).Decode(&r); err != nil {
		return r, fmt.Errorf("lazy-pages helper's result: %w", err)
	}
	return r, nil
}

// attachFetch relays a post-copy's fetch streams (from the source; by
// pageserver.FetchRole) to the helper, whose fetch clients take them over
// (requests in flight are asked again on them).
func (l *lazyRestore) attachFetch(st [2]*transport.Stream) error {
	if l.gone {
		return errors.New("lazy restore: no helper to relay fetch streams to")
	}
	for role, s := range st {
		h, err := l.dial(streamFetch, byte(role))
		if err != nil {
			return fmt.Errorf("lazy restore: relay fetch stream: %w", err)
		}
		l.mu.Lock()
		l.relays = append(l.relays, h, s)
		l.mu.Unlock()
		go relay(h, s) // owned by the streams: ends when either closes
	}
	return nil
}

// relay copies a and b into each other until either ends, then closes both.
func relay(a, b io.ReadWriteCloser) {
	done := make(chan struct{}, 2)
	go func() { io.Copy(a, b); done <- struct{}{} }()
	go func() { io.Copy(b, a); done <- struct{}{} }()
	<-done
	a.Close()
	b.Close()
}

// park keeps the daemon's end of the restore's connection open in CRIU
// (lazy.Daemon.Park), so that the held tree stays resumable if the helper
// dies: whoever resumes it then makes its memory whole first
// (resumeHeld). Called once the restore holds the tree, before PREPARED.
func (l *lazyRestore) park(root int) error {
	r, err := l.request(lazyRequest{Op: "park", Root: root})
	if err == nil {
		err = r.error()
	}
	return err
}

// failed reports, without waiting, whether the daemon already stopped
// with an error (or its helper is gone): before the tree resumes, its
// lazy pages are then not coming from it.
func (l *lazyRestore) failed() error {
	r, err := l.request(lazyRequest{Op: "status"})
	if err != nil {
		return err
	}
	if r.Ended {
		return r.error()
	}
	return nil
}

// refill makes a held tree's memory whole without the daemon, which
// failed: it ends the helper (closing the userfaultfds) and writes every
// lazy page from the images (lazy.Refill), which post-copy cannot (its
// pages are at the source).
func (l *lazyRestore) refill(imagesDir string, root int) error {
	if l.postcopy {
		return fmt.Errorf("post-copy: the missing pages are at the source")
	}
	l.kill()
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

// kill ends the helper (its userfaultfds close: call it once the tree is
// gone or needs it no longer) and waits until it is gone.
func (l *lazyRestore) kill() {
	l.mu.Lock()
	for _, c := range l.relays {
		c.Close()
	}
	l.relays = nil
	l.mu.Unlock()
	if l.alive() {
		if err := killExact(l.pid, l.start); err != nil {
			l.log.Error("kill lazy-pages helper", "pid", l.pid, "err", err)
		}
	}
	if l.exited != nil {
		<-l.exited
	}
	l.removeGroup()
}

func (l *lazyRestore) removeGroup() {
	if l.group == nil {
		return
	}
	if err := l.group.Remove(); err != nil {
		l.log.Warn("remove lazy-pages helper's cgroup", "err", err)
	}
	l.group = nil
}

// abort ends the helper of a restore that failed or was dropped (its tree
// killed first).
func (l *lazyRestore) abort() {
	if l != nil {
		l.kill()
	}
}

// detach readies the tree of a restore held in doubt to outlive this
// service (lazy.Daemon.Detach): every lazy page is filled now, within
// timeout, and the helper ends, leaving a tree that needs no daemon when
// it resumes. An error means the tree misses pages: CRIU kills it if told
// to resume it (the finish marker has nowhere to go), and the helper
// keeps the userfaultfds open until it is killed.
func (l *lazyRestore) detach(timeout time.Duration) error {
	t0 := time.Now()
	r, err := l.request(lazyRequest{Op: "detach", TimeoutMS: timeout.Milliseconds()})
	if err == nil {
		err = r.error()
	}
	if err != nil {
		return fmt.Errorf("lazy restore: detach: %w (stats %+v)", err, r.Stats)
	}
	l.finished()
	l.log.Info("lazy restore detached: every page in place", "stats", fmt.Sprintf("%+v", r.Stats), "dur", time.Since(t0))
	return nil
}

// finished waits for a helper whose daemon ended well to exit, and
// removes its cgroup.
func (l *lazyRestore) finished() {
	if l.exited != nil {
		select {
		case <-l.exited:
		case <-time.After(10 * time.Second):
			l.log.Warn("lazy-pages helper did not exit after its daemon ended", "pid", l.pid)
		}
	}
	l.removeGroup()
}

// wait returns once every lazy page is in place (or the daemon failed),
// logs what the fill took and returns the daemon's account and how many
// pages came from the source.
func (l *lazyRestore) wait() (lazy.Stats, uint64, error) {
	if l == nil {
		return lazy.Stats{}, 0, nil
	}
	r, err := l.request(lazyRequest{Op: "wait"})
	if err == nil {
		err = r.error()
	}
	if err != nil {
		// The tree runs and is the only copy. Closing the userfaultfds
		// would have the missing pages read as zeros: the helper keeps
		// them, so a thread that touches one waits.
		l.log.Error("lazy restore failed: threads touching the missing pages wait; the tree is incomplete",
			"err", err, "stats", fmt.Sprintf("%+v", r.Stats), "helper", l.pid)
		return r.Stats, r.RemotePages, fmt.Errorf("lazy restore: %w", err)
	}
	l.finished()
	l.log.Info("lazy pages done", "fault_pages", r.Stats.FaultPages, "pushed_pages", r.Stats.PushedPages,
		"remote_pages", r.RemotePages, "helper", l.pid, "dur", time.Since(l.t0), "stats", fmt.Sprintf("%+v", r.Stats))
	return r.Stats, r.RemotePages, nil
}

// logTail is the end of the file at path, for an error message.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return string(b)
}

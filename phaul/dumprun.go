package phaul

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
	"github.com/phaul/phaul/pageserver"
)

// dumpRun is the source's migration from the page streams on: the rounds,
// the freeze (CRIU's dump and its notifications), the commit and, in
// post-copy, serving the destination until it has every page. Its steps
// follow the states of machine.go; each method is one of them.
type dumpRun struct {
	s         *source
	bin       *criu.Binary
	imagesDir string
	ctlStream *transport.Stream

	pages  *pageStream
	pre    *precopy     // every mode but cold
	filter *finalFilter // the store CRIU's full final dump writes into
	fetch  *fetchServer // post-copy's fetch streams

	// How the freeze runs: a lazy dump (CRIU copies no anonymous memory
	// and holds the tree), and post-copy on top (the held tree outlives
	// the commit).
	lazy, postcopy bool
	sess           *lazySession // phaul's end of CRIU's lazy page-server session

	// Set by CRIU's notifications (on CRIU's RPC goroutine, before the
	// dump returns or held/gone fire).
	frozen, dumped time.Time
	acked          bool // post-dump answered with success: CRIU ends the tree
	prepared       *wire.Prepared
	sent           []images.File
	nftTable       string // CRIU's network-lock table, named by the dump's inventory

	dumpDone    chan error    // CRIU's dump returned
	remoteSaved chan error    // post-copy: the remote set is on disk
	held        chan struct{} // post-copy: the tree is held by phaul's open session
	// gone reports that no process of the lazily dumped tree can run
	// again after phaul ended CRIU's session (each has exited or is being
	// killed): the commit need not wait for CRIU's cleanup nor for the
	// kernel to free the tree's memory.
	gone     chan error
	heldTree bool   // the dump outlives the commit (post-copy)
	endHeld  func() // ends it: the held tree is killed, never resumed
	// keepHeld leaves CRIU holding the tree when phaul exits: in doubt
	// at COMMIT, only the destination knows which copy may run.
	keepHeld bool
	// resuming: endHeld lets the tree run again (a rollback), instead of
	// killing it.
	resuming bool
	hold     *cgroup.Hold // the held tree's frozen cgroup (freezehold.go)
	cleanup  []func()     // run by close, last first
	unlock   func() error // the host's dump lock
}

func newDumpRun(s *source, bin *criu.Binary, imagesDir string, ctlStream *transport.Stream) *dumpRun {
	postcopy := s.cfg.Mode.postcopy()
	r := &dumpRun{s: s, bin: bin, imagesDir: imagesDir, ctlStream: ctlStream,
		postcopy: postcopy, lazy: postcopy || (s.cfg.Mode == ModePrecopy && s.cfg.FinalDump == FinalDumpLazy),
		dumpDone: make(chan error, 1), remoteSaved: make(chan error, 1), held: make(chan struct{}), gone: make(chan error, 1)}
	r.endHeld = sync.OnceFunc(func() {
		if r.keepHeld {
			s.log.Error("in doubt: CRIU keeps holding the source's frozen copy; `phaul gc --show` names it",
				"pid", s.cfg.PID, "migration", s.stats.MigrationID)
			return
		}
		if r.resuming {
			r.sess.reject()
		} else {
			r.sess.end()
			r.killHold() // CRIU kills it too; a frozen tree dies once thawed
		}
		if err := r.endDump(<-r.dumpDone); err != nil {
			s.log.Warn("criu failed after the tree was held", "err", err)
		}
		if r.resuming {
			r.releaseHold()
		}
	})
	return r
}

// close undoes what the run set up, last first.
func (r *dumpRun) close() {
	for i := len(r.cleanup) - 1; i >= 0; i-- {
		r.cleanup[i]()
	}
}

// dumpAndCommit runs the migration from the page streams on.
func (s *source) dumpAndCommit(ctx context.Context, bin *criu.Binary, imagesDir string, ctlStream *transport.Stream) error {
	r := newDumpRun(s, bin, imagesDir, ctlStream)
	defer r.close()
	if err := r.start(ctx); err != nil {
		return err
	}
	if err := r.settle(r.dump(ctx)); err != nil {
		return err
	}
	// From COMMIT on the destination's copy may run: a cancel (SIGINT,
	// SIGTERM, phaul cancel) can no longer roll back, and must not break
	// what follows; it is refused.
	stopRefusing := context.AfterFunc(ctx, func() {
		s.log.Warn("cancel refused: COMMIT went out, the destination's copy may run; the migration goes on to its end")
	})
	defer stopRefusing()
	ctx = context.WithoutCancel(ctx)
	running, err := r.commit(ctx)
	if err != nil {
		return err
	}
	if s.cfg.Mode.postcopy() {
		// The destination's tree runs: the source's must never run again,
		// whatever happens to post-copy.
		if err := s.awaitPostcopy(ctx, r.fetch, r.pre.remote, running); err != nil {
			s.phase(PhaseInDoubt)
			return fmt.Errorf("%w: %w", ErrInDoubt, s.postcopyLost(r.pre.remote, r.fetch, err))
		}
	}
	if r.heldTree {
		r.endHeld()
	}
	s.removeNetworkLock(r.nftTable)
	s.phase(PhaseDone)
	s.log.Info("migrated", "dest_pid", s.stats.DestPID, "downtime_ms", s.stats.DowntimeMS,
		"bytes", s.stats.BytesImages)
	return nil
}

// start opens the page (and fetch) streams, runs the pre-copy rounds, and
// decides how the freeze runs. A failure rolls back: the tree runs on.
func (r *dumpRun) start(ctx context.Context) error {
	s, cfg := r.s, r.s.cfg
	// Cold: CRIU dumps into the forwarder; else the final pass filters
	// what the rounds sent.
	store := func(fw *pageserver.Forwarder) pageserver.Store {
		if cfg.Mode == ModeCold {
			return fw
		}
		r.pre = newPrecopy(s, fw, cfg.PID)
		r.pre.postcopy = r.postcopy
		r.filter = &finalFilter{p: r.pre, ctx: ctx}
		return r.filter
	}
	var err error
	if r.pages, err = s.startPages(ctx, store); err != nil {
		return err
	}
	fail := func(err error) error {
		r.pages.finish()
		return err
	}
	if r.postcopy {
		if r.fetch, err = s.openFetch(ctx); err != nil {
			return fail(err)
		}
		r.cleanup = append(r.cleanup, r.fetch.close)
	}
	if r.pre != nil {
		// Whatever the outcome: a killed source needs nothing undone, a
		// resumed one runs untracked again.
		r.cleanup = append(r.cleanup, r.pre.stop)
	}
	if r.pre != nil && cfg.Mode.rounds() {
		if err := s.precopyRounds(ctx, r.pre); err != nil {
			if ctx.Err() == nil && !errors.Is(err, ErrAborted) {
				// A stream the destination closed: it may have said why.
				if why := s.peerReason(r.ctlStream, nil); why != nil {
					err = fmt.Errorf("%w (%w)", why, err)
				}
			}
			r.pages.finish()
			s.phase(PhaseRollback)
			s.abort(fmt.Sprintf("pre-copy failed: %v", err))
			return s.rolledBack(fmt.Errorf("pre-copy: %w", err))
		}
	}
	if r.lazy {
		if why := lazyBlocker(cfg.PID); why != "" {
			r.lazy, r.postcopy, r.pre.postcopy = false, false, false
			s.cfg.FinalDump = FinalDumpFull // the final pass reads it
			s.stats.FinalDumpWhy = why
			s.log.Warn("final dump: full, not lazy", "why", why)
		}
	}
	if r.pre != nil && cfg.Mode.rounds() {
		s.stats.FinalDump = s.cfg.FinalDump
	}
	// One CRIU dump at a time on this host: concurrent dumps collide in
	// CRIU's parasite ("Can't create a directory (-17)", seen with two
	// migrations started together).
	if err := privateDir(filepath.Dir(cfg.DumpLock)); err != nil {
		return fail(fmt.Errorf("dump lock: %w", err))
	}
	unlock, err := linux.LockFile(cfg.DumpLock, cfg.DumpLockTimeout)
	if err != nil {
		return fail(fmt.Errorf("dump lock: %w", err))
	}
	r.cleanup = append(r.cleanup, func() { unlock() })
	if r.lazy {
		if r.sess, err = newLazySession(); err != nil {
			return fail(err)
		}
		r.cleanup = append(r.cleanup, r.sess.started) // if CRIU never started
	}
	return nil
}

// notify answers CRIU's dump notifications: the freeze (pre-dump) and the
// dump written (post-dump: the final set, the images, PREPARED; after a
// lazy dump, CRIU then holds the tree on phaul's session).
func (r *dumpRun) notify(ctx context.Context, script string, _ int32) error {
	switch script {
	case "pre-dump":
		return r.onFreeze()
	case "post-dump":
		if err := r.onDumped(ctx); err != nil {
			return err
		}
		if r.lazy {
			return r.onHeld()
		}
	}
	return nil
}

// onFreeze: CRIU is about to freeze the tree.
func (r *dumpRun) onFreeze() error {
	if r.pre != nil {
		// CRIU must find the tree in the cgroups it came from.
		if err := r.pre.releaseThrottle(); err != nil {
			return fmt.Errorf("auto-converge: %w", err)
		}
	}
	r.frozen = time.Now()
	r.s.phase(PhaseDump)
	return nil
}

// onDumped: the tree is frozen and its images written; after a lazy dump
// the final set is built from the held tree. The images go, the
// destination restores; success (PREPARED) lets CRIU end the tree, a
// failure resumes it.
func (r *dumpRun) onDumped(ctx context.Context) error {
	s := r.s
	r.dumped = time.Now()
	s.stats.CRIUDumpMS = ms(r.dumped.Sub(r.frozen))
	if r.nftTable = networkLockTable(r.imagesDir); r.nftTable != "" {
		// CRIU's lock: kept after a dump that kills the tree.
		if err := s.j.record(func(e *JournalEntry) { e.NftTable = r.nftTable }); err != nil {
			return err
		}
	}
	if r.lazy {
		if err := r.pre.finalLazy(ctx, r.imagesDir); err != nil {
			s.log.Warn("rolling back", "err", err)
			return err
		}
		if r.postcopy {
			r.fetch.serve(r.pre.remote, s.log)
			// For a phaul that takes over if this one dies (phaul
			// recover); written while the destination restores.
			remote, path := r.pre.remote, remotePath(s.cfg.WorkDir, s.stats.MigrationID)
			go func() { r.remoteSaved <- writeRemoteSet(path, remote) }() // owned by the run: commit drains it
		}
	}
	var err error
	r.sent, r.prepared, err = s.transfer(ctx, r.imagesDir, r.ctlStream)
	if err != nil {
		s.log.Warn("rolling back", "err", err)
		return err
	}
	r.acked = true
	return nil
}

// onHeld: post-dump succeeded, so CRIU goes on to serve phaul's session,
// holding the tree, which phaul freezes in its hold (freezehold.go). The
// session stays open through COMMIT (and, in post-copy, until the
// destination has every page): a destination that fails to resume its
// copy says so, and this one resumes. Without a hold, a pre-copy ends the
// session now, which kills the tree (the destination holds it,
// PREPARED): CRIU killed later would let it run beside the destination's.
// CRIU reads the session once it has the notification's answer.
func (r *dumpRun) onHeld() error {
	if err := r.holdTree(); err != nil {
		r.releaseHold()
		if errors.Is(err, errTreeRan) {
			return err
		}
		r.s.log.Warn("source tree not held in a frozen cgroup: a CRIU killed holding it would let it run", "err", err)
	}
	r.cleanup = append(r.cleanup, func() {
		if !r.keepHeld {
			r.releaseHold() // a rollback the run ended without endHeld
		}
	})
	if r.postcopy || r.hold != nil {
		close(r.held)
		return nil
	}
	// The tree is frozen: its pids are stable and cannot be reused before
	// the pidfds below hold them.
	pfds, err := openTree(r.s.cfg.PID)
	if err != nil {
		return err
	}
	r.sess.end()
	go func() { // owned by the run, which drains gone
		defer closeAll(pfds)
		r.gone <- linux.WaitDoomed(pfds, r.s.cfg.CommitTimeout)
	}()
	return nil
}

// criuStarted records the CRIU that will hold the tree, so that whoever
// finds this migration unfinished can resolve what CRIU holds.
func (r *dumpRun) criuStarted(pid int) error {
	if r.sess != nil {
		r.sess.started()
	}
	r.s.criuPID = pid
	st, err := linux.ReadProcessStat(pid)
	if err != nil {
		return fmt.Errorf("criu: %w", err)
	}
	return r.s.j.record(func(e *JournalEntry) { e.CRIU, e.CRIUStart = pid, st.StartTicks })
}

// endDump adds phaul's end of CRIU's lazy session to CRIU's result.
func (r *dumpRun) endDump(err error) error {
	if r.sess != nil {
		if herr := r.sess.wait(); herr != nil && err == nil {
			err = herr
		}
	}
	return err
}

// dump runs CRIU's dump until the tree is gone (or, in post-copy, held
// for good) or the dump failed.
func (r *dumpRun) dump(ctx context.Context) error {
	s := r.s
	req := criu.DumpRequest{Pid: s.cfg.PID, ImagesDir: r.imagesDir, Options: s.cfg.CRIU}
	dctx := ctx
	req.Started = r.criuStarted
	if r.lazy {
		req.LazySocket, req.LazyPeer = r.sess.criuEnd, r.sess.peer
		if r.postcopy {
			// Once the destination may run, CRIU must hold the tree
			// whatever phaul is told: a canceled dump would let
			// CRIU resume it.
			dctx = context.WithoutCancel(ctx)
		}
	} else {
		req.PageServer = r.pages.criuEnd
		r.pages.start()
	}
	go func() { r.dumpDone <- r.bin.Dump(dctx, req, criu.NotifyFunc(r.notify)) }() // owned by the run: drained below or by close
	select {
	case err := <-r.dumpDone:
		return r.endDump(err)
	case <-r.held:
		// CRIU and phaul's hold keep the tree until COMMITTED (post-copy:
		// until the destination has every page); the dump ends after.
		r.heldTree = true
		r.cleanup = append(r.cleanup, r.endHeld)
		return nil
	case gerr := <-r.gone:
		if gerr != nil {
			s.log.Warn("source tree after the lazy session", "err", gerr)
			return r.endDump(<-r.dumpDone)
		}
		// The tree is dead: commit now, CRIU finishes meanwhile.
		s.log.Debug("source tree killed; committing before CRIU's cleanup ends")
		r.cleanup = append(r.cleanup, func() {
			if err := r.endDump(<-r.dumpDone); err != nil {
				s.log.Warn("criu failed after the tree exited", "err", err)
			}
		})
		return nil
	}
}

// settle decides, from the dump's outcome, whether the migration goes on
// to COMMIT or rolls back: one copy must run.
func (r *dumpRun) settle(err error) error {
	s := r.s
	pstats, perr := r.pages.finish()
	if err != nil && r.filter != nil && r.filter.err != nil {
		// The root cause: CRIU only saw its page server go away.
		err = fmt.Errorf("pre-copy final phase: %w (criu: %w)", r.filter.err, err)
	}
	if err == nil && perr != nil {
		s.log.Warn("page stream ended badly after a good dump", "err", perr)
	}
	if err != nil && perr != nil {
		// The page stream broke: the destination may have said why.
		if why := s.peerReason(r.ctlStream, nil); why != nil {
			err = fmt.Errorf("%w (criu: %w)", why, err)
		}
	}
	if err != nil && !r.acked {
		// CRIU's own rollback unlocks the network; a CRIU that died
		// left its lock on a tree that runs again.
		s.removeNetworkLock(r.nftTable)
		s.phase(PhaseRollback)
		s.abort(fmt.Sprintf("source dump failed: %v", err))
		return s.rolledBack(fmt.Errorf("dump: %w", err))
	}
	if err != nil {
		// CRIU failed after post-dump succeeded. Whether the tree died
		// decides.
		if alive, _ := linux.ProcessExists(s.cfg.PID); alive {
			s.removeNetworkLock(r.nftTable)
			s.phase(PhaseRollback)
			s.abort(fmt.Sprintf("source dump failed after post-dump: %v", err))
			return s.rolledBack(fmt.Errorf("dump: %w", err))
		}
		s.log.Warn("criu failed after killing the tree; committing", "err", err)
	}
	s.stats.DestPID = int(r.prepared.GetPid())
	s.stats.CRIURestoreMS = ms(time.Duration(r.prepared.GetRestoreNanos()))
	s.stats.BytesImages = images.Total(r.sent) + pstats.Pages*pagestore.PageSize
	s.stats.Rounds = append(s.stats.Rounds, Round{Round: len(s.stats.Rounds) + 1, Kind: "final", BytesImages: s.stats.BytesImages,
		Files: len(r.sent), DurationMS: ms(time.Since(r.frozen)), Pages: &pstats})
	return nil
}

// resumeHeld rolls back a post-copy whose destination never committed:
// CRIU resumes the held tree, as if post-dump had failed.
func (r *dumpRun) resumeHeld(why error) error {
	s := r.s
	r.resuming = true
	r.endHeld() // waits for CRIU, which let the tree go; then it thaws
	// CRIU leaves its network lock after a failed lazy session: the tree
	// runs here again, and the lock would only cut it off.
	s.removeNetworkLock(r.nftTable)
	s.phase(PhaseRollback)
	s.log.Warn("rolled back: the source's copy resumes", "why", why)
	return s.rolledBack(fmt.Errorf("commit: %w", why))
}

// commit sends COMMIT: from here on the destination's copy may run, and
// the source's never does again. It returns when the destination's tree
// runs, and records the downtime.
func (r *dumpRun) commit(ctx context.Context) (time.Time, error) {
	s := r.s
	if r.postcopy {
		if err := <-r.remoteSaved; err != nil {
			s.log.Warn("post-copy: remote set not saved: if this phaul dies, phaul recover cannot take over", "err", err)
		}
	}
	s.phase(PhaseCommit)
	stop := deadline(ctx, r.ctlStream, s.cfg.CommitTimeout)
	defer stop()
	destPID, err := s.commit()
	if errors.Is(err, errNotCommitted) && r.heldTree {
		// The destination's copy never ran (its CRIU died before the
		// resume): this one is whole and held.
		return time.Time{}, r.resumeHeld(err)
	}
	if err != nil && r.heldTree && r.postcopy {
		// Post-copy: the destination's tree may run and need the held
		// one's pages. A resume is accepted only once it committed; a
		// destination that dropped the migration says so.
		s.log.Warn("post-copy: commit outcome unknown; reconnecting", "err", err)
		switch rerr := s.reconnect(ctx, r.fetch, r.pre.remote); {
		case rerr == nil:
			destPID, err = s.stats.DestPID, nil
		case errors.Is(rerr, errNotCommitted):
			return time.Time{}, r.resumeHeld(rerr)
		default:
			err = fmt.Errorf("%w; reconnect: %w", err, rerr)
		}
	}
	if err != nil {
		// Which copy may run is the destination's to say: a post-copy
		// source keeps its copy held (CRIU outlives phaul).
		r.keepHeld = r.heldTree
		s.phase(PhaseInDoubt)
		return time.Time{}, fmt.Errorf("%w: %w", ErrInDoubt, err)
	}
	running := time.Now()
	rtt := time.Duration(s.stats.RTTMS * float64(time.Millisecond))
	s.stats.DowntimeMS = ms(running.Sub(r.frozen) - rtt/2)
	for _, rd := range s.stats.Rounds {
		if rd.Kind == "frozen" {
			s.stats.DowntimeDirtyMS = rd.DurationMS
			s.stats.DowntimeCRIUMS = s.stats.DowntimeMS - rd.DurationMS
		}
	}
	s.stats.DestPID = destPID
	return running, nil
}

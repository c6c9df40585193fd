package phaul

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
)

// Taking over a post-copy whose phaul migrate died. The destination's
// tree runs and lacks the pages only the source's held copy has; it waits
// --postcopy-recover-timeout for a source to come back. phaul recover
// adopts the journal entry, dials the destination as the dead migrate
// would have (Hello{resume}), serves the fetch streams from the held tree
// with the remote set the migrate saved before COMMIT, and once the
// destination has every page kills the held copy and ends the entry. A
// destination that never committed says so: the held copy resumes.

// RecoverConfig says which migration to take over and how to reach its
// destination.
type RecoverConfig struct {
	WorkDir string // the dead migrate's --work-dir
	ID      string
	// To and TLSDir default to what the migrate recorded.
	To, TLSDir             string
	PostcopyRecoverTimeout time.Duration
	Transport              transport.Config
	Logger                 *slog.Logger
	Progress               func(Event)
}

// ErrNotRecoverable: the entry is no post-copy a phaul can take over.
var ErrNotRecoverable = errors.New("nothing to take over")

// Recover takes over post-copy migration cfg.ID. On success the
// destination holds every page and the source's copy is gone; if the
// destination had never committed, the source's copy runs again and the
// error wraps errNotCommitted.
func Recover(ctx context.Context, cfg RecoverConfig) (*Stats, error) {
	log := discardIfNil(cfg.Logger).With("migration", cfg.ID)
	e, j, err := adoptPostcopy(cfg.WorkDir, cfg.ID)
	if err != nil {
		return nil, err
	}
	mcfg := DefaultMigrateConfig()
	mcfg.To, mcfg.TLSDir, mcfg.Mode, mcfg.PID, mcfg.WorkDir = e.To, e.TLSDir, e.Mode, e.Root, cfg.WorkDir
	if cfg.To != "" {
		mcfg.To = cfg.To
	}
	if cfg.TLSDir != "" {
		mcfg.TLSDir = cfg.TLSDir
	}
	if cfg.PostcopyRecoverTimeout > 0 {
		mcfg.PostcopyRecoverTimeout = cfg.PostcopyRecoverTimeout
	}
	mcfg.Progress, mcfg.Logger = cfg.Progress, log
	st := newStats(cfg.ID, e.Mode, mcfg.To, e.Root)
	s := &source{cfg: mcfg, log: log, stats: st, m: machine{log: log, cur: PhaseCommit}, j: j}
	s.stats.mark(PhaseCommit)
	err = s.takeOver(ctx, e)
	switch {
	case err == nil:
		st.Result = ResultOK
		if jerr := j.remove(); jerr != nil {
			log.Error("journal", "err", jerr)
		}
	case errors.Is(err, errNotCommitted):
		st.Result = ResultFailed
		if jerr := j.remove(); jerr != nil {
			log.Error("journal", "err", jerr)
		}
	default:
		st.Result = ResultInDoubt
	}
	if err != nil {
		st.Error = err.Error()
	}
	st.TotalMS = ms(time.Since(st.start))
	return st, err
}

// adoptPostcopy makes this process the owner of id's source entry, if
// its migrate is gone and it left a held post-copy copy with its remote
// set. gc's lock on the journal keeps the check and the write whole.
func adoptPostcopy(workDir, id string) (JournalEntry, *journal, error) {
	dir := JournalDir(workDir)
	release, err := linux.LockDir(dir, 30*time.Second)
	if err != nil {
		return JournalEntry{}, nil, fmt.Errorf("recover: %w", err)
	}
	defer release()
	e, err := ReadEntry(dir, id, RoleSource)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return e, nil, fmt.Errorf("recover: %w: no migration %s in %s", ErrNotRecoverable, id, workDir)
	case err != nil:
		return e, nil, fmt.Errorf("recover: %w", err)
	case e.OwnerAlive():
		return e, nil, fmt.Errorf("recover: %w: migration %s is still driven by pid %d", ErrNotRecoverable, id, e.Owner)
	case !e.Mode.postcopy() || (e.Phase != PhaseCommit && e.Phase != PhasePostcopy && e.Phase != PhaseInDoubt):
		return e, nil, fmt.Errorf("recover: %w: migration %s (%s) ended at %s, not in post-copy; phaul gc resolves it",
			ErrNotRecoverable, id, e.Mode, e.Phase)
	}
	if _, n := sourceHold(e); n == 0 && !(e.CRIUAlive() && heldBy(e.Root, e.CRIU)) {
		return e, nil, fmt.Errorf("recover: %w: the source's held copy of %s is gone", ErrNotRecoverable, id)
	}
	if _, err := os.Stat(remotePath(workDir, id)); err != nil {
		return e, nil, fmt.Errorf("recover: %w: %s has no remote set: %w", ErrNotRecoverable, id, err)
	}
	st, err := linux.ReadProcessStat(os.Getpid())
	if err != nil {
		return e, nil, fmt.Errorf("recover: %w", err)
	}
	e.Owner, e.OwnerStart = os.Getpid(), st.StartTicks
	j := &journal{path: entryPath(dir, id, RoleSource), e: e}
	if err := j.write(); err != nil {
		return e, nil, err
	}
	return e, j, nil
}

// takeOver resumes the post-copy on a new connection and serves it to
// its end; then the held copy dies (or, never committed, resumes).
func (s *source) takeOver(ctx context.Context, e JournalEntry) error {
	remote, err := readRemoteSet(remotePath(s.cfg.WorkDir, e.ID))
	if err != nil {
		return err
	}
	id, err := transport.LoadTLS(s.cfg.TLSDir)
	if err != nil {
		return fmt.Errorf("tls dir: %w", err)
	}
	s.tcfg = s.cfg.Transport
	s.tcfg.Identity, s.tcfg.Logger = id, s.log
	fs := &fetchServer{}
	defer fs.close()
	defer func() {
		if s.sess != nil {
			s.sess.Close()
		}
	}()
	s.log.Info("taking over the post-copy", "to", s.cfg.To, "remote_pages", remote.pages, "tasks", len(remote.tasks))
	if err := s.reconnect(ctx, fs, remote); err != nil {
		if errors.Is(err, errNotCommitted) {
			s.phase(PhaseRollback)
			if rerr := resumeSource(e); rerr != nil {
				// The entry stays: gc resumes it (--resolved ID=source).
				return fmt.Errorf("%v; resuming the held copy failed (phaul gc --resolved %s=source): %w", err, e.ID, rerr)
			}
			s.removeNetworkLock(e.NftTable)
			s.log.Warn("rolled back: the destination never committed; the source's copy resumes", "why", err)
			return err
		}
		s.phase(PhaseInDoubt)
		return fmt.Errorf("%w: %w", ErrInDoubt, err)
	}
	if err := s.awaitPostcopy(ctx, fs, remote, time.Now()); err != nil {
		s.phase(PhaseInDoubt)
		return fmt.Errorf("%w: %w", ErrInDoubt, s.postcopyLost(remote, fs, err))
	}
	if err := killHeldTree(e); err != nil {
		s.log.Error("kill the held source copy: phaul gc finishes it", "err", err)
	}
	s.removeNetworkLock(e.NftTable)
	if err := os.RemoveAll(e.ImagesDir); err != nil {
		s.log.Warn("remove images", "dir", e.ImagesDir, "err", err)
	}
	s.phase(PhaseDone)
	s.log.Info("post-copy taken over and done")
	return nil
}

package phaul

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/linux"
)

// A service that starts takes over the committed lazy restores a previous
// one left running: their lazy-pages helpers (lazyrestore.go) kept the
// trees' userfaultfds and went on filling from the images. The new service
// resumes a tree that COMMIT reached before its resume, accepts the
// source's reconnect for a post-copy (and relays its fetch streams to the
// helper), and ends the migration as the old one would have: PostcopyDone
// to the source once every page is in, files removed, entry done.

// adopt takes over e if it is a committed lazy restore whose helper runs
// (or ended and left its result). It returns nil, nil for any other entry.
func (s *Server) adopt(e JournalEntry, log *slog.Logger) (*incoming, error) {
	dir := filepath.Join(s.cfg.WorkDir, e.ID)
	_, resultErr := os.Stat(filepath.Join(dir, lazyResultFile))
	if !e.Lazy || e.LazyHelper <= 0 || (e.Phase != PhaseCommit && e.Phase != PhasePostcopy) ||
		(!e.HelperAlive() && resultErr != nil) {
		return nil, nil
	}
	jdir := JournalDir(s.cfg.WorkDir)
	release, err := linux.LockDir(jdir, 30*time.Second)
	if err != nil {
		return nil, err
	}
	defer release()
	st, err := linux.ReadProcessStat(os.Getpid())
	if err != nil {
		return nil, err
	}
	e.Owner, e.OwnerStart = os.Getpid(), st.StartTicks
	j := &journal{path: entryPath(jdir, e.ID, RoleDestination), e: e}
	if err := j.write(); err != nil {
		return nil, err
	}
	lz, err := adoptLazyRestore(s.cfg.WorkDir, e, log)
	if err != nil {
		return nil, err
	}
	in := &incoming{id: e.ID, dir: dir, log: log, mode: e.Mode, postcopy: e.Mode.postcopy(), lazy: lz, pid: e.Root, j: j}
	in.m.log = log
	in.m.adopt(PhaseCommit) // finishRestore enters post-copy or done from there
	if in.postcopy {
		in.link = &postcopyLink{peer: e.Peer, changed: make(chan struct{}), done: make(chan struct{})}
	}
	if e.Phase == PhaseCommit && e.CRIUAlive() {
		log.Warn("migration committed by a previous service that ended before the tree resumed: resuming it", "pid", e.Root)
		if err := resumeCommitted(e); err != nil {
			lz.kill()
			return nil, err
		}
	}
	s.mu.Lock()
	s.active[in.id] = in
	s.mu.Unlock()
	log.Warn("took over a migration a previous service left filling its tree", "helper", e.LazyHelper, "postcopy", in.postcopy)
	return in, nil
}

// resumeCommitted lets CRIU resume e's committed tree, whose lazy pages
// its helper serves: moved to its cgroup parent first, as commit does.
func resumeCommitted(e JournalEntry) error {
	if g, err := cgroup.Open(e.ID); err == nil {
		if err := g.MoveAll(e.CgroupParent); err != nil {
			return fmt.Errorf("resume committed tree: %w", err)
		}
		defer g.Remove()
	}
	resp, err := criu.AnswerHeld(e.CRIU, e.CRIUPeerFD, true, time.Minute)
	if err != nil {
		return fmt.Errorf("resume committed tree: %w", err)
	}
	if !resp.GetSuccess() {
		return errors.New("resume committed tree: criu failed to resume it (see restore.log)")
	}
	return nil
}

// finishAdopted ends an adopted migration as finishRestore does; a
// post-copy waits for its source to reconnect (resume) for its pages.
func (s *Server) finishAdopted(in *incoming) {
	defer s.forget(in)
	s.finishRestore(in)
}

package phaul

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
)

// The destination's restore and its end: CRIU rebuilds the tree and holds
// it (restore), which then waits for the source's decision (awaitCommit):
// COMMIT runs it (commit, then finishRestore once its memory is in),
// ABORT or a lost source before COMMIT drops it (cleanup), and a lost
// source after PREPARED leaves it held in doubt (inDoubtHold).

// awaitCommit waits for COMMIT or ABORT with the tree held in CRIU's
// restore. It returns true once the tree runs.
func (s *Server) awaitCommit(ctx context.Context, in *incoming, stream *transport.Stream) (bool, error) {
	// Shutdown does not cut this wait short at once: the source may have
	// killed its copy already, so the service gives COMMIT CommitWait to
	// arrive before it leaves the tree in doubt.
	waitCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stopOnShutdown := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(s.cfg.CommitWait, cancel)
		context.AfterFunc(waitCtx, func() { t.Stop() })
	})
	defer stopOnShutdown()
	stop := deadline(waitCtx, stream, s.cfg.StepTimeout)
	defer stop()
	m, err := in.ctl.Recv()
	if err != nil && in.postcopy {
		// A post-copy source ends its copy only after PostcopyDone,
		// which follows COMMIT: without COMMIT that copy is whole, held
		// by its CRIU, and the one to resume. A source that comes back
		// to resume is told so (dropped).
		s.cleanup(in)
		in.log.Warn("post-copy: source lost before COMMIT; its copy is whole and held there: restored tree dropped", "err", err)
		return false, fmt.Errorf("post-copy: source lost before COMMIT: %w", err)
	}
	if err != nil {
		s.inDoubtHold(in, fmt.Errorf("wait for commit: %w", err))
		return false, fmt.Errorf("%w: %w", ErrInDoubt, err)
	}
	switch b := m.GetBody().(type) {
	case *wire.Message_Commit:
		in.phase(PhaseCommit)
		if err := s.commit(in); err != nil {
			// The tree never ran and is gone: the source's copy, held
			// until COMMITTED, is the one to resume.
			abort := &wire.Message{Body: &wire.Message_Abort{Abort: &wire.Abort{Reason: "not committed: " + err.Error()}}}
			if serr := in.ctl.Send(abort); serr != nil {
				in.log.Error("restored tree lost before it ran, and the source could not be told", "err", serr)
			}
			s.cleanup(in)
			return false, err
		}
		in.log.Info("committed: tree runs", "pid", in.pid)
		if err := in.ctl.Send(&wire.Message{Body: &wire.Message_Committed{Committed: &wire.Committed{Pid: int32(in.pid)}}}); err != nil {
			// The migration is done: the tree runs here and the source
			// had killed its copy before it sent COMMIT. Only the
			// confirmation did not arrive (the source may already have
			// closed the session).
			in.log.Info("committed; confirmation not delivered to the source", "err", err)
		}
		return true, nil
	case *wire.Message_Abort:
		s.cleanup(in)
		in.log.Info("aborted by the source after prepared: restored tree dropped", "reason", b.Abort.GetReason())
		return false, nil
	default:
		s.inDoubtHold(in, fmt.Errorf("unexpected %s while prepared", wire.Name(m)))
		return false, fmt.Errorf("%w: unexpected %s", ErrInDoubt, wire.Name(m))
	}
}

// inDoubtHold leaves a prepared tree held inside CRIU's restore and
// records it. CRIU keeps its own copy of the RPC socket, so the tree stays
// held (rebuilt, never run) even after this service exits. A lazily
// restored tree gets all of its memory first, so that it no longer needs
// this service's lazy-pages daemon.
func (s *Server) inDoubtHold(in *incoming, why error) {
	in.phase(PhaseInDoubt)
	s.mu.Lock()
	s.inDoubt[in.id] = in.pid
	s.mu.Unlock()
	memory := memoryComplete
	if in.lazy != nil {
		// Recorded first: if this service dies during the fill, the
		// tree misses pages for good.
		in.hold.record(in, why, memoryFilling)
		if err := in.lazy.detach(s.cfg.RestoreTimeout); err != nil {
			memory = memoryIncomplete
			in.log.Error("in-doubt tree misses memory: if told to resume it, CRIU kills it", "err", err)
		}
	}
	in.hold.record(in, why, memory)
	in.log.Error("migration in doubt: restored tree held inside CRIU's restore, never run; resolve by hand: "+
		"kill CRIU and the cgroup's processes to drop it, or answer CRIU's post-restore notification on its fd criu_rpc_fd",
		"pid", in.pid, "criu", in.hold.criuPID, "criu_rpc_fd", in.hold.peerFD, "cgroup", cgroup.Parent+"/"+in.id,
		"memory", memory, "reason", why)
}

// lazyRestore reports whether in's restore is lazy: post-copy's always
// is, the others with --lazy-restore.
func (s *Server) lazyRestore(in *incoming) bool {
	return in.postcopy || (s.cfg.LazyRestore && linux.HaveUserfaultfd() == nil)
}

// restore has CRIU rebuild the tree inside a cgroup this service owns
// (phaul/<id>, so the tree is neither part of the service's unit nor its
// child) and hold it in the post-restore notification: it returns the
// restored root's pid with no task of the tree having run.
func (s *Server) restore(ctx context.Context, in *incoming) (int, error) {
	in.phase(PhaseRestore)
	g, err := cgroup.Create(in.id)
	if err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	in.group = g
	started := g.Add
	if l := s.policy.limits(); l != (cgroup.Limits{}) {
		// The policy caps the tree: it is restored into its own group in
		// the pids and memory hierarchies and stays there once it runs.
		in.j.record(func(e *JournalEntry) { e.Cgroups = append(e.Cgroups, cgroup.Parent+"/"+limitsGroupName(in.id)) })
		if in.limits, err = cgroup.CreateLimited(limitsGroupName(in.id), l); err != nil {
			return 0, fmt.Errorf("restore: the policy's limits: %w", err)
		}
		started = func(pid int) error { return errors.Join(g.Add(pid), in.limits.Add(pid)) }
	}
	in.reserve.Release() // for the restore to reuse
	req := criu.RestoreRequest{
		ImagesDir: filepath.Join(in.dir, "images"),
		WorkDir:   in.dir,
		Options:   in.opts,
		Hooks:     criu.Hooks{Started: started},
	}
	if s.lazyRestore(in) {
		in.j.record(func(e *JournalEntry) { e.Cgroups = append(e.Cgroups, cgroup.Parent+"/"+lazyGroupName(in.id)) })
		if in.lazy, err = startLazyRestore(s.helperExe, in.id, in.dir, req.ImagesDir, in.postcopy, s.cfg.PostcopyRecoverTimeout, in.log); err != nil {
			return 0, fmt.Errorf("restore: %w", err)
		}
		in.j.record(func(e *JournalEntry) { e.LazyHelper, e.LazyHelperStart = in.lazy.pid, in.lazy.start })
		if in.postcopy {
			if err := in.lazy.attachFetch(in.fetchStreams); err != nil {
				in.lazy.abort()
				in.lazy = nil
				return 0, fmt.Errorf("restore: %w", err)
			}
		}
		req.LazyPages = true
	}
	in.hold = startRestore(ctx, s.crit, req, s.cfg.RestoreTimeout)
	pid, err := in.hold.wait()
	if err != nil {
		in.hold = nil
		in.lazy.abort()
		in.lazy = nil
		return 0, fmt.Errorf("restore: %w", err)
	}
	return pid, nil
}

// commit moves the held tree where it lives from now on and lets CRIU
// resume it. With --manage-cgroups CRIU has put it in its own cgroups;
// otherwise it is in phaul/<id> and moves to the service's cgroup parent.
// Then phaul/<id> goes.
func (s *Server) commit(in *incoming) error {
	if in.lazy != nil {
		if lerr := in.lazy.failed(); lerr != nil {
			// Parked, CRIU would resume the tree with its lazy pages
			// reading as zeros.
			if err := in.lazy.refill(filepath.Join(in.dir, "images"), in.pid); err != nil {
				in.log.Error("lazy-pages daemon failed before the tree ran and its pages cannot be written otherwise: "+
					"the tree is dropped, not run without them; the source's copy resumes", "daemon", lerr, "err", err)
				in.hold.Kill()
				in.hold = nil
				return fmt.Errorf("restored tree dropped: its lazy pages are lost: %w", lerr)
			}
		}
	}
	if err := in.hold.gone(); err != nil {
		// CRIU died holding the tree, which never ran: the source
		// resumes its copy, held until COMMITTED (docs/protocol.md §6).
		// What CRIU left is still in phaul/<id>, where cleanup kills it.
		in.log.Error("COMMIT arrived but CRIU died before it resumed the tree: dropped, the source's copy resumes", "err", err)
		return fmt.Errorf("resume: %w", err)
	}
	if err := in.group.MoveAll(s.cfg.CgroupParent); err != nil {
		// The source's copy is gone: the tree must run, wherever it is.
		in.log.Error("move restored tree to its cgroup parent", "parent", s.cfg.CgroupParent, "err", err)
	}
	if err := in.hold.Resume(); err != nil {
		in.log.Error("criu after resuming the restored tree", "err", err)
	}
	if err := in.group.Remove(); err != nil {
		in.log.Warn("remove cgroup", "err", err)
	}
	return nil
}

// cleanup drops whatever was restored and removes the migration's files
// and cgroup.
func (s *Server) cleanup(in *incoming) {
	if in.hold != nil {
		in.hold.Kill()
		in.hold = nil
	}
	in.lazy.abort() // after the tree is gone
	in.lazy = nil
	in.closeFetch()
	for _, g := range []*cgroup.Group{in.group, in.limits} {
		if g == nil {
			continue
		}
		if err := g.Kill(5 * time.Second); err != nil {
			in.log.Error("kill restored tree", "err", err)
		}
		if err := g.Remove(); err != nil {
			in.log.Warn("remove cgroup", "err", err)
		}
	}
	if in.dir != "" {
		if err := os.RemoveAll(in.dir); err != nil {
			in.log.Warn("remove work dir", "err", err)
		}
	}
	in.phase(PhaseRollback)
	in.endJournal()
	s.mu.Lock()
	s.dropped.add(in.id)
	s.mu.Unlock()
}

// recentIDs remembers the last migrations a service dropped before they
// committed, so that a post-copy source which lost its connection at
// COMMIT learns for sure that its copy is the one to resume. A bounded
// memory: a service restarted since does not know, and says nothing.
type recentIDs struct {
	ids  []string
	next int
}

const recentDropped = 256

func (r *recentIDs) add(id string) {
	if len(r.ids) < recentDropped {
		r.ids = append(r.ids, id)
		return
	}
	r.ids[r.next] = id
	r.next = (r.next + 1) % recentDropped
}

func (r *recentIDs) has(id string) bool { return slices.Contains(r.ids, id) }

// finishRestore waits for a committed tree's lazy pages (the images are
// their source until the fill ends), tells a post-copy source that it may
// drop its copy, and removes the migration's files.
func (s *Server) finishRestore(in *incoming) {
	if in.postcopy {
		// A source that lost its connection may come back until
		// PostcopyDone is through.
		in.phase(PhasePostcopy)
		in.link.setResumable(true)
		defer in.link.end()
	}
	st, remote, err := in.lazy.wait()
	if in.postcopy {
		if err == nil {
			err = in.link.send(postcopyDoneMsg(st, remote), s.cfg.PostcopyRecoverTimeout)
		}
		if err != nil {
			in.log.Error("post-copy failed: the tree runs here and lacks pages the source held", "err", err)
		}
		in.closeFetch()
	}
	s.removeImages(in)
	if err == nil {
		in.phase(PhaseDone)
		in.endJournal()
	}
	// Else the entry stays: the tree runs without all of its memory.
}

// removeImages drops a committed migration's files.
func (s *Server) removeImages(in *incoming) {
	if err := os.RemoveAll(in.dir); err != nil {
		in.log.Warn("remove work dir", "err", err)
	}
}

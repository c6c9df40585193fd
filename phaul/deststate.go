package phaul

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/phaul/phaul/core/cgroup"
)

// The destination's side of the state machine and the journal: each
// migration enters its states through in.phase, which records the state
// durably before it takes effect, and a service that starts finds the
// entries of migrations a previous one left unfinished (recoverJournal).

// phase enters p: journal first, then the machine, then the log.
func (in *incoming) phase(p Phase) {
	err := in.j.record(func(e *JournalEntry) {
		e.Phase, e.Root = p, in.pid
		if in.hold != nil {
			e.CRIU = in.hold.criuPID
		}
	})
	if err != nil {
		in.log.Error("journal", "phase", p, "err", err)
	}
	in.m.enter(p)
	in.log.Info("phase", "phase", p)
}

// openJournal starts in's journal entry.
func (s *Server) openJournal(in *incoming, mode Mode) {
	j, err := openJournal(JournalDir(s.cfg.WorkDir), in.id, RoleDestination,
		JournalEntry{Phase: PhasePreflight, Mode: mode, ImagesDir: in.dir, Cgroups: []string{cgroup.Parent + "/" + in.id}})
	if err != nil {
		in.log.Error("journal", "err", err)
		return
	}
	in.j = j
}

// endJournal drops in's entry: the migration ended and left nothing to
// resolve (done, or rolled back with everything removed).
func (in *incoming) endJournal() {
	if err := in.j.remove(); err != nil {
		in.log.Error("journal", "err", err)
	}
}

// recoverJournal resolves, at start, the destination entries a previous
// service left: a migration that had not reached PREPARED is undone (its
// cgroup's processes killed, the cgroup and the directory removed); a
// prepared or in-doubt one stays held and is reported (only an operator
// knows whether the source copy is gone); one that had committed runs
// and is reported (its lazy fill, if unfinished, is lost with the old
// service: see README); a finished one's entry goes.
func (s *Server) recoverJournal() {
	ents, err := ReadJournal(JournalDir(s.cfg.WorkDir))
	if err != nil {
		s.log.Error("journal", "err", err)
		return
	}
	for _, e := range ents {
		if e.Role != RoleDestination || e.OwnerAlive() {
			continue
		}
		log := s.log.With("migration", e.ID, "phase", e.Phase, "owner", e.Owner)
		switch e.Phase {
		case PhasePrepared, PhaseInDoubt:
			s.mu.Lock()
			s.inDoubt[e.ID] = e.Root
			s.mu.Unlock()
			log.Error("migration in doubt from a previous service: restored tree held, never run; resolve by hand "+
				"(docs/protocol.md §6)", "pid", e.Root, "criu", e.CRIU, "dir", filepath.Join(s.cfg.WorkDir, e.ID))
			continue
		case PhaseCommit, PhasePostcopy:
			log.Error("migration committed by a previous service that ended before the tree had all of its memory: "+
				"the tree runs; pages it had not received read as zeros", "pid", e.Root)
		case PhaseDone, PhaseRollback:
		default:
			if err := undoUnprepared(s.cfg.WorkDir, e); err != nil {
				log.Error("undo an unfinished migration", "err", err)
				continue
			}
			log.Warn("undid an unfinished migration of a previous service: its restore, cgroup and files are gone")
		}
		if err := os.Remove(entryPath(JournalDir(s.cfg.WorkDir), e.ID, e.Role)); err != nil {
			log.Error("journal", "err", err)
		}
	}
}

// undoUnprepared kills what a migration that never reached PREPARED left
// running in its cgroup (CRIU, a half-restored tree) and removes the
// cgroup and its directory.
func undoUnprepared(workDir string, e JournalEntry) error {
	var errs []error
	if g, err := cgroup.Open(e.ID); err == nil {
		errs = append(errs, g.Kill(5*time.Second), g.Remove())
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	dir := filepath.Join(workDir, e.ID)
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

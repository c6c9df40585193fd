package phaul

import (
	"path/filepath"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
)

// The destination's side of the state machine and the journal: each
// migration enters its states through in.phase, which records the state
// durably before it takes effect, and a service that starts finds the
// entries of migrations a previous one left unfinished (recoverJournal).

// phase enters p: journal first, then the machine, then the log.
func (in *incoming) phase(p Phase) {
	err := in.j.record(func(e *JournalEntry) {
		e.Phase, e.Root = p, in.pid
		if in.hold != nil && e.CRIU != in.hold.criuPID {
			e.CRIU, e.CRIUPeerFD = in.hold.criuPID, in.hold.peerFD
			if st, err := linux.ReadProcessStat(e.CRIU); err == nil {
				e.CRIUStart = st.StartTicks
			}
		}
		e.Lazy = in.lazy != nil
	})
	if err != nil {
		in.log.Error("journal", "phase", p, "err", err)
	}
	criuPID := 0
	if in.hold != nil {
		criuPID = in.hold.criuPID
	}
	faultAt(RoleDestination, p, criuPID)
	in.m.enter(p)
	in.log.Info("phase", "phase", p)
}

// openJournal starts in's journal entry.
func (s *Server) openJournal(in *incoming, mode Mode) {
	j, err := openJournal(JournalDir(s.cfg.WorkDir), in.id, RoleDestination,
		JournalEntry{Phase: PhasePreflight, Mode: mode, ImagesDir: in.dir, Cgroups: []string{cgroup.Parent + "/" + in.id},
			CgroupParent: s.cfg.CgroupParent, Peer: certDigest(in.sess.Peer())})
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
// service left, as phaul gc does (gc.go): a migration that had not
// reached PREPARED is undone; a prepared or in-doubt one stays held and is
// reported (only the source's side knows whether its copy is gone); a
// committed one whose lazy-pages helper still runs is taken over
// (adopt: the caller runs finishAdopted for each it returns); another
// committed one runs, and its files go.
func (s *Server) recoverJournal() []*incoming {
	ents, err := ReadJournal(JournalDir(s.cfg.WorkDir))
	if err != nil {
		s.log.Error("journal", "err", err)
		return nil
	}
	var adopted []*incoming
	for _, e := range ents {
		if e.Role != RoleDestination || e.OwnerAlive() {
			continue
		}
		log := s.log.With("migration", e.ID, "phase", e.Phase, "owner", e.Owner)
		if in, err := s.adopt(e, log); in != nil {
			adopted = append(adopted, in)
			continue
		} else if err != nil {
			log.Error("could not take over the migration's lazy restore", "err", err)
		}
		switch {
		case (e.Phase == PhasePrepared && !e.Mode.postcopy()) || e.Phase == PhaseInDoubt:
			s.mu.Lock()
			s.inDoubt[e.ID] = e.Root
			s.mu.Unlock()
			log.Error("migration in doubt from a previous service: restored tree held, never run; resolve by hand "+
				"(docs/protocol.md §6)", "pid", e.Root, "criu", e.CRIU, "dir", filepath.Join(s.cfg.WorkDir, e.ID))
		case (e.Phase == PhaseCommit || e.Phase == PhasePostcopy) && e.CRIUAlive():
			log.Warn("migration committed by a previous service that ended before the tree resumed: resuming it", "pid", e.Root)
		case e.Phase == PhaseCommit || e.Phase == PhasePostcopy:
			log.Error("migration committed by a previous service, whose lazy-pages helper is gone too: "+
				"the tree runs; pages it had not received read as zeros", "pid", e.Root, "helper", e.LazyHelper)
		}
	}
	rep, err := GC(s.cfg.WorkDir, GCOptions{Apply: true, Role: RoleDestination, Logger: s.log})
	if err != nil {
		s.log.Error("journal", "err", err)
	}
	for _, l := range rep.Leftovers {
		if l.Kind == "journal" && l.Done {
			s.log.Warn("undid an unfinished migration of a previous service", "migration", l.Migration, "phase", l.Phase)
		}
	}
	return adopted
}

package phaul

import (
	"fmt"
	"log/slog"
	"sync"
)

// The migration as one state machine. Both ends name their states with
// the same Phases; the table says, for each, which copy of the workload is
// the truth, what a failure there does, and which states may follow.
// Both agents enter every state through a machine, which logs a transition
// the table does not allow as a bug (and the tests check every migration's
// recorded phases against the table).

// stateSpec describes one state.
type stateSpec struct {
	// truth is the copy that is the workload while in this state.
	truth string
	// undo is what a failure in this state does.
	undo string
	// next lists the states that may follow; none: the state is final.
	next []Phase
}

var states = map[Phase]stateSpec{
	PhasePreflight: {
		truth: "source: runs, untouched",
		undo:  "nothing to undo",
		next:  []Phase{PhaseConnect, PhaseRollback}},
	PhaseConnect: {
		truth: "source: runs, untouched",
		undo:  "close the session; the destination drops its directory",
		next:  []Phase{PhaseRounds, PhaseDump, PhaseTransfer, PhaseRollback}},
	PhaseRounds: {
		truth: "source: runs, its memory tracked and copied",
		undo:  "release the trackers (and the throttle); the destination drops its page store",
		next:  []Phase{PhaseDump, PhaseTransfer, PhaseRollback}},
	PhaseDump: {
		truth: "source: frozen by CRIU, intact",
		undo:  "fail CRIU's post-dump notification: CRIU unlocks the network and resumes the tree",
		next:  []Phase{PhaseTransfer, PhaseRollback}},
	PhaseTransfer: {
		truth: "source: frozen by CRIU, intact",
		undo:  "as in dump; the destination removes the images",
		next:  []Phase{PhaseRestore, PhaseRollback}},
	PhaseRestore: {
		truth: "source: frozen by CRIU, intact",
		undo:  "as in dump; the destination has CRIU kill what it restored",
		next:  []Phase{PhasePrepared, PhaseRollback}},
	PhasePrepared: {
		truth: "source until CRIU ends it; then the destination's held copy (never run)",
		undo:  "before post-dump is answered: the destination kills its copy and the source resumes; after: in doubt",
		next:  []Phase{PhaseCommit, PhaseRollback, PhaseInDoubt}},
	PhaseCommit: {
		truth: "destination (from COMMIT on it may run); the source never runs again",
		undo: "none: in doubt if COMMITTED does not come; post-copy reconnects first, and rolls back " +
			"(CRIU resumes the held source copy) if the destination answers that it dropped the migration before COMMIT",
		next: []Phase{PhasePostcopy, PhaseDone, PhaseInDoubt, PhaseRollback}},
	PhasePostcopy: {
		truth: "destination runs; the pages it lacks are only in the source's frozen, held copy",
		undo:  "none: reconnect within --postcopy-recover-timeout, else both sides report what each holds",
		next:  []Phase{PhaseDone, PhaseInDoubt}},
	PhaseDone: {
		truth: "destination runs, whole; the source copy is gone",
		undo:  "final"},
	PhaseRollback: {
		truth: "source runs on; the destination holds nothing",
		undo:  "final"},
	PhaseInDoubt: {
		truth: "unknown to this end: the other end's log and state file say",
		undo:  "final: resolved by an operator (or the journal)"},
}

// ValidTransition reports whether the machine allows from -> to.
func ValidTransition(from, to Phase) bool {
	for _, n := range states[from].next {
		if n == to {
			return true
		}
	}
	return false
}

// Final reports whether p ends a migration.
func (p Phase) Final() bool { return len(states[p].next) == 0 }

// ParsePhase returns the phase named s (Phase.String).
func ParsePhase(s string) (Phase, error) {
	for i, n := range phaseNames {
		if n == s {
			return Phase(i), nil
		}
	}
	return 0, fmt.Errorf("unknown phase %q", s)
}

// machine is one end's current state.
type machine struct {
	mu  sync.Mutex
	cur Phase
	log *slog.Logger
}

// enter moves to p. A transition the table does not allow is a bug: it is
// logged as one and returned, and the move happens all the same (what the
// code did is what the records must show).
func (m *machine) enter(p Phase) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var err error
	if !ValidTransition(m.cur, p) {
		err = fmt.Errorf("state machine: %s -> %s is not a transition", m.cur, p)
		m.log.Error("bug", "err", err)
	}
	m.cur = p
	return err
}

// adopt puts the machine in p without a transition: a service that takes
// over a migration from the journal resumes it where its entry says.
func (m *machine) adopt(p Phase) {
	m.mu.Lock()
	m.cur = p
	m.mu.Unlock()
}

// state returns the current state.
func (m *machine) state() Phase {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.cur
}

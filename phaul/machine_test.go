package phaul

import "testing"

// TestMachineTable: every phase has a state, the final ones have no way
// out, every state is reachable from preflight and can reach an end.
func TestMachineTable(t *testing.T) {
	all := make([]Phase, len(phaseNames))
	for i := range all {
		all[i] = Phase(i)
		spec, ok := states[Phase(i)]
		if !ok || spec.truth == "" || spec.undo == "" {
			t.Errorf("phase %s: no state, or without truth and undo: %+v", Phase(i), spec)
		}
		if p, err := ParsePhase(Phase(i).String()); err != nil || p != Phase(i) {
			t.Errorf("ParsePhase(%q) = %v, %v", Phase(i).String(), p, err)
		}
	}
	if len(states) != len(phaseNames) {
		t.Errorf("%d states for %d phases", len(states), len(phaseNames))
	}
	for _, f := range []Phase{PhaseDone, PhaseRollback, PhaseInDoubt} {
		if !f.Final() {
			t.Errorf("%s is not final", f)
		}
	}
	reach := map[Phase]bool{PhasePreflight: true}
	for changed := true; changed; {
		changed = false
		for p := range reach {
			for _, n := range states[p].next {
				if !reach[n] {
					reach[n], changed = true, true
				}
			}
		}
	}
	for _, p := range all {
		if !reach[p] {
			t.Errorf("%s cannot be reached from preflight", p)
		}
		if !p.Final() && !canEnd(p, map[Phase]bool{}) {
			t.Errorf("%s can never end", p)
		}
	}
	if _, err := ParsePhase("nonsense"); err == nil {
		t.Error("ParsePhase accepted nonsense")
	}
}

func canEnd(p Phase, seen map[Phase]bool) bool {
	if p.Final() {
		return true
	}
	seen[p] = true
	for _, n := range states[p].next {
		if !seen[n] && canEnd(n, seen) {
			return true
		}
	}
	return false
}

// TestMachineEnter: an allowed transition moves silently; one the table
// does not allow is reported, and recorded all the same.
func TestMachineEnter(t *testing.T) {
	m := machine{log: discardIfNil(nil)}
	for _, p := range []Phase{PhaseConnect, PhaseRounds, PhaseDump, PhaseTransfer, PhaseRestore, PhasePrepared, PhaseCommit, PhasePostcopy, PhaseDone} {
		if err := m.enter(p); err != nil {
			t.Fatalf("enter %s: %v", p, err)
		}
	}
	if err := m.enter(PhaseRollback); err == nil || m.state() != PhaseRollback {
		t.Fatalf("done -> rollback: %v, state %s; want an error and the move recorded", err, m.state())
	}
}

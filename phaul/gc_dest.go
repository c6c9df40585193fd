package phaul

import (
	"fmt"
	"path/filepath"
)

// What a restore leaves on the destination, and how gc resolves it (the
// held copy itself: heldrecover.go).

// destLeftovers plans the destination side of e. Before PREPARED the
// restore never counted: its processes, cgroup and directory go. A
// prepared post-copy is dropped too: its source holds its copy whole
// until post-copy ends (and the held copy here lacks the pages only the
// source has). Any other prepared or in-doubt copy is left held until the
// operator says which copy runs (winner). A committed copy CRIU still
// holds (the service died between COMMIT and the resume) is resumed, its
// memory made whole from the images first. What is left of a committed
// migration is its files.
func destLeftovers(workDir string, e JournalEntry, resolved bool, winner string) []Leftover {
	dir := filepath.Join(workDir, e.ID)
	held := fmt.Sprintf("restored tree %d held by criu %d", e.Root, e.CRIU)
	switch {
	case e.Phase == PhasePrepared && e.Mode.postcopy(), e.Phase < PhasePrepared:
		plan := []Leftover{}
		for _, cg := range e.Cgroups {
			plan = append(plan, cgroupLeftover(e, cg)...)
		}
		if l, ok := pathLeftover(workDir, dir, "work-dir", "a restore that never committed: its images and state"); ok {
			plan = append(plan, l)
		}
		return plan
	case (e.Phase == PhasePrepared || e.Phase == PhaseInDoubt) && e.CRIUAlive():
		switch winner {
		case "source":
			return []Leftover{{Kind: "held-tree", What: held, Why: "in doubt, resolved by the operator: the source's copy runs",
				Action: "have CRIU drop the held copy", apply: func() error { return dropHeld(workDir, e) }}}
		case "destination":
			return []Leftover{{Kind: "held-tree", What: held, Why: "in doubt, resolved by the operator: this copy runs",
				Action: "resume the held copy", apply: func() error { return resumeHeld(workDir, e) }}}
		}
		if !resolved {
			return []Leftover{{Kind: "held-tree", What: held,
				Why: "in doubt: the source's log and journal say whether its copy still runs; then phaul gc --resolved " +
					e.ID + "=source drops this copy, =destination resumes it"}}
		}
	case (e.Phase == PhaseCommit || e.Phase == PhasePostcopy) && e.CRIUAlive():
		return []Leftover{{Kind: "held-tree", What: held,
			Why:    "COMMIT arrived but the service ended before the tree resumed: the source's copy is gone",
			Action: "resume the committed copy", apply: func() error { return resumeHeld(workDir, e) }}}
	}
	var plan []Leftover
	for _, cg := range e.Cgroups {
		for _, l := range cgroupLeftover(e, cg) {
			if l.Action != "remove" {
				// A committed tree is never killed: only an empty group goes.
				l.Action, l.apply = "", nil
				l.Why = "holds processes of a committed migration: left"
			}
			plan = append(plan, l)
		}
	}
	if l, ok := pathLeftover(workDir, dir, "work-dir", "a finished migration's images and state, no longer read"); ok {
		plan = append(plan, l)
	}
	return plan
}

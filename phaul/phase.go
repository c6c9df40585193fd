package phaul

import "fmt"

// Phase is a step of a migration, in the order a successful one takes them.
type Phase int

const (
	PhasePreflight Phase = iota // local checks, CRIU lookup
	PhaseConnect                // TLS + yamux session, hello exchange
	PhaseRounds                 // pre-copy: memory moves while the tree runs
	PhaseDump                   // CRIU dump running, tree frozen
	PhaseTransfer               // images on the wire
	PhaseRestore                // destination restoring the tree stopped
	PhasePrepared               // destination holds a stopped copy
	PhaseCommit                 // source tree killed (post-copy: held), COMMIT sent
	PhasePostcopy               // post-copy: the destination runs the tree and fetches what it lacks
	PhaseDone                   // destination runs the tree, all of its memory there
	PhaseRollback               // failure before commit: source resumes
	PhaseInDoubt                // commit outcome unknown
)

var phaseNames = [...]string{"preflight", "connect", "rounds", "dump", "transfer", "restore", "prepared",
	"commit", "postcopy", "done", "rollback", "in-doubt"}

func (p Phase) String() string {
	if p >= 0 && int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return fmt.Sprintf("phase(%d)", int(p))
}

// MarshalText makes phases readable in JSON.
func (p Phase) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads a phase's name (journal entries).
func (p *Phase) UnmarshalText(b []byte) error {
	q, err := ParsePhase(string(b))
	if err != nil {
		return err
	}
	*p = q
	return nil
}

// Mode is how memory moves.
type Mode string

const (
	// ModeCold freezes the tree, dumps everything, restores it.
	ModeCold Mode = "cold"
	// ModePrecopy moves memory in rounds while the tree runs, then freezes
	// it and moves what is left.
	ModePrecopy Mode = "precopy"
	// ModePostcopy freezes the tree at once; the destination runs it
	// before its memory arrived and fetches missing pages on fault, the
	// rest in the background.
	ModePostcopy Mode = "postcopy"
	// ModeHybrid runs pre-copy rounds until the dirty set stops
	// shrinking or HybridRounds are spent, then post-copy.
	ModeHybrid Mode = "hybrid"
)

// postcopy reports whether m resumes the tree before its memory arrived.
func (m Mode) postcopy() bool { return m == ModePostcopy || m == ModeHybrid }

// rounds reports whether m copies memory while the tree runs.
func (m Mode) rounds() bool { return m == ModePrecopy || m == ModeHybrid }

// ParseMode checks a --mode value.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeCold, ModePrecopy, ModePostcopy, ModeHybrid:
		return Mode(s), nil
	}
	return "", fmt.Errorf("mode %q: want precopy, hybrid, postcopy or cold", s)
}

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
	PhaseCommit                 // source tree killed, COMMIT sent
	PhaseDone                   // destination runs the tree
	PhaseRollback               // failure before commit: source resumes
	PhaseInDoubt                // commit outcome unknown
)

var phaseNames = [...]string{"preflight", "connect", "rounds", "dump", "transfer", "restore", "prepared",
	"commit", "done", "rollback", "in-doubt"}

func (p Phase) String() string {
	if p >= 0 && int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return fmt.Sprintf("phase(%d)", int(p))
}

// MarshalText makes phases readable in JSON.
func (p Phase) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// Mode is how memory moves.
type Mode string

const (
	// ModeCold freezes the tree, dumps everything, restores it.
	ModeCold Mode = "cold"
	// ModePrecopy moves memory in rounds while the tree runs, then freezes
	// it and moves what is left.
	ModePrecopy Mode = "precopy"
)

// ParseMode checks a --mode value.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeCold, ModePrecopy:
		return Mode(s), nil
	}
	return "", fmt.Errorf("mode %q: want precopy or cold (post-copy is not built yet)", s)
}

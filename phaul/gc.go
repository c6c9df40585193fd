package phaul

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
)

// phaul gc: what a dump or an unfinished migration left on this host,
// found from the journal of a work dir (journal.go), and each resolved the
// safe way (docs/protocol.md §8): a source tree that CRIU holds for a
// migration that never committed resumes; one whose destination has run
// is killed, never resumed; CRIU's network lock, the images, phaul's
// cgroups go. A migration whose phaul still runs is not touched, nor is
// one in doubt (only the destination knows which copy may run), nor
// anything no journal entry names.

// Leftover is one thing gc found.
type Leftover struct {
	Migration string `json:"migration"`
	Role      string `json:"role"`
	Phase     string `json:"phase,omitempty"`
	// Kind: criu (a CRIU holding the source tree), held-tree, nft-table,
	// images, cgroup, work-dir, journal.
	Kind string `json:"kind"`
	What string `json:"what"`
	Why  string `json:"why"`
	// Action is what gc does about it; empty: it is left, Why says why.
	Action string `json:"action,omitempty"`
	Done   bool   `json:"done,omitempty"`
	Err    string `json:"error,omitempty"`

	apply func() error
}

// GCReport is what one gc run found and did.
type GCReport struct {
	WorkDir    string     `json:"work_dir,omitempty"`
	ImagesDirs []string   `json:"images_dirs,omitempty"`
	Leftovers  []Leftover `json:"leftovers"`
	// Busy lists the migrations whose phaul still runs: not leftovers.
	Busy []string `json:"busy,omitempty"`
}

// GCOptions says what GC does.
type GCOptions struct {
	// Apply removes what is found; otherwise GC only lists it (--show).
	Apply bool
	// Resolved names migrations in doubt that the operator has resolved,
	// with the copy that runs: "source", "destination", or "" when the
	// operator has resumed or dropped the copies by hand. What they left
	// goes like that of a finished migration. A source tree CRIU still
	// holds resumes when the source's copy runs, is killed when the
	// destination's does, and is left otherwise.
	Resolved map[string]string
	// Role, if set, limits GC to one end's entries (an agent's start-up).
	Role string
	// ImagesDirs are the images dirs of dumps phaul did not drive (CRIU's
	// -D) whose restore will never happen: what CRIU left for the
	// restore goes (link remaps, its network lock).
	ImagesDirs []string
	Logger     *slog.Logger
}

// GC finds what unfinished migrations left on this host, from workDir's
// journal, and removes it when told. Idempotent: a second run finds
// nothing the first could remove.
func GC(workDir string, o GCOptions) (GCReport, error) {
	log, apply, resolved := discardIfNil(o.Logger), o.Apply, o.Resolved
	rep := GCReport{WorkDir: workDir, ImagesDirs: o.ImagesDirs}
	// One resolver at a time per journal: a service starting and an
	// operator's gc must not both resume one held tree.
	if workDir != "" {
		if release, err := linux.LockDir(JournalDir(workDir), 30*time.Second); err == nil {
			defer release()
		} else if !errors.Is(err, fs.ErrNotExist) {
			return rep, err
		}
	}
	for _, dir := range o.ImagesDirs {
		plan, err := dumpLeftovers(dir)
		if err != nil {
			return rep, err
		}
		rep.Leftovers = append(rep.Leftovers, applyAll(plan, apply, log)...)
	}
	if workDir == "" {
		return rep, nil
	}
	ents, err := ReadJournal(JournalDir(workDir))
	if err != nil {
		return rep, err
	}
	for _, e := range ents {
		if o.Role != "" && e.Role != o.Role {
			continue
		}
		if e.OwnerAlive() && !(e.Phase == PhaseInDoubt && e.Memory != memoryFilling) {
			// An owner that left its migration in doubt has given it up
			// to the operator (once a held copy has all its memory).
			rep.Busy = append(rep.Busy, fmt.Sprintf("%s %s: at %s, phaul pid %d runs", e.Role, e.ID, e.Phase, e.Owner))
			continue
		}
		if e.Role == RoleDestination && (e.Phase == PhaseCommit || e.Phase == PhasePostcopy) && e.HelperAlive() {
			// The committed tree's pages come from it; phaul serve, when
			// it starts, takes the migration over (dest_adopt.go).
			rep.Busy = append(rep.Busy, fmt.Sprintf("%s %s: at %s, its lazy-pages helper pid %d fills the tree; phaul serve takes it over when it starts",
				e.Role, e.ID, e.Phase, e.LazyHelper))
			continue
		}
		var plan []Leftover
		winner, isResolved := resolved[e.ID]
		if e.Role == RoleSource {
			plan = sourceLeftovers(workDir, e, isResolved, winner)
		} else {
			plan = destLeftovers(workDir, e, isResolved, winner)
		}
		rep.Leftovers = append(rep.Leftovers, resolve(workDir, e, plan, apply, log)...)
	}
	if o.Role == "" {
		rep.Leftovers = append(rep.Leftovers, applyAll(strayCRIUs(workDir, ents), apply, log)...)
		rep.Leftovers = append(rep.Leftovers, applyAll(strayLimitGroups(ents), apply, log)...)
	}
	return rep, nil
}

// applyAll applies plan in order (with apply); a leftover without an
// action stays, listed.
func applyAll(plan []Leftover, apply bool, log *slog.Logger) []Leftover {
	for i := range plan {
		l := &plan[i]
		if l.apply == nil || !apply {
			continue
		}
		if err := l.apply(); err != nil {
			l.Err = err.Error()
			log.Error("gc", "migration", l.Migration, "kind", l.Kind, "what", l.What, "err", err)
			continue
		}
		l.Done = true
		log.Warn("gc: "+l.Action, "migration", l.Migration, "phase", l.Phase, "kind", l.Kind, "what", l.What, "why", l.Why)
	}
	return plan
}

// resolve applies plan in order (with apply), then drops e's entry once
// nothing of it is left.
func resolve(workDir string, e JournalEntry, plan []Leftover, apply bool, log *slog.Logger) []Leftover {
	for i := range plan {
		plan[i].Migration, plan[i].Role, plan[i].Phase = e.ID, e.Role, e.Phase.String()
	}
	applyAll(plan, apply, log)
	left := false
	for _, l := range plan {
		if !l.Done && (l.apply == nil || apply) {
			left = true
		}
	}
	entry := Leftover{Migration: e.ID, Role: e.Role, Phase: e.Phase.String(), Kind: "journal",
		What: entryPath(JournalDir(workDir), e.ID, e.Role),
		Why:  fmt.Sprintf("unfinished: its phaul (pid %d) ended at %s", e.Owner, e.Phase)}
	if !left {
		entry.Action = "remove the entry"
		if apply {
			err := errors.Join(ignoreNotExist(os.Remove(remotePath(workDir, e.ID))), ignoreNotExist(os.Remove(entry.What)))
			if err != nil {
				entry.Err = err.Error()
			} else {
				entry.Done = true
			}
		}
	}
	return append(plan, entry)
}

// pathLeftover plans removing path, which must be inside workDir (the
// entry names it; phaul made it).
func pathLeftover(workDir, path, kind, why string) (Leftover, bool) {
	if path == "" || !exists(path) {
		return Leftover{}, false
	}
	l := Leftover{Kind: kind, What: path, Why: why}
	rel, err := filepath.Rel(workDir, path)
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		l.Why = fmt.Sprintf("named by the journal but outside %s: left alone", workDir)
		return l, true
	}
	l.Action = "remove"
	l.apply = func() error { return os.RemoveAll(path) }
	return l, true
}

// cgroupLeftover plans a cgroup the migration made ("HIERARCHY:PATH" or a
// name under phaul/ in the freezer and cgroup2 hierarchies).
func cgroupLeftover(e JournalEntry, cg string) []Leftover {
	if h, group, ok := strings.Cut(cg, ":"); ok {
		if h != "cpu" {
			return nil
		}
		root, err := linux.CPUV1Root()
		if err != nil || !exists(filepath.Join(root, group)) {
			return nil
		}
		return []Leftover{{Kind: "cgroup", What: cg, Why: "auto-converge's throttle: the tree's CPU stays capped",
			Action: "move its processes back to " + e.ThrottleBack + ", remove it",
			apply:  func() error { return cgroup.ReleaseThrottle(group, e.ThrottleBack) }}}
	}
	name, ok := strings.CutPrefix(cg, cgroup.Parent+"/")
	if !ok {
		return nil
	}
	g, err := cgroup.Open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return []Leftover{{Kind: "cgroup", What: cg, Why: "cannot open: " + err.Error()}}
	}
	procs, _ := g.Procs()
	why := "the migration's cgroup, empty"
	action := "remove"
	if len(procs) > 0 {
		why = fmt.Sprintf("the migration's cgroup, holding %d processes of a restore that never committed", len(procs))
		action = "kill its processes, remove it"
	}
	return []Leftover{{Kind: "cgroup", What: cg, Why: why, Action: action,
		apply: func() error { return errors.Join(g.Kill(5*time.Second), g.Remove()) }}}
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func waitUntil(timeout time.Duration, done func() bool, format string, args ...any) error {
	deadline := time.Now().Add(timeout)
	for !done() {
		if time.Now().After(deadline) {
			return fmt.Errorf(format, args...)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

func ignoreNotExist(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

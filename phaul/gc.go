package phaul

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/images"
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
		if release, err := linux.LockDir(JournalDir(workDir)); err == nil {
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
		var plan []Leftover
		winner, isResolved := resolved[e.ID]
		if e.Role == RoleSource {
			plan = sourceLeftovers(workDir, e, isResolved, winner)
		} else {
			plan = destLeftovers(workDir, e, isResolved, winner)
		}
		rep.Leftovers = append(rep.Leftovers, resolve(workDir, e, plan, apply, log)...)
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
			err := os.Remove(entry.What)
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				entry.Err = err.Error()
			} else {
				entry.Done = true
			}
		}
	}
	return append(plan, entry)
}

// sourceLeftovers plans the source side of e: its held tree first (what
// CRIU holds decides everything else), then CRIU's network lock, the
// images, the throttle cgroup.
func sourceLeftovers(workDir string, e JournalEntry, resolved bool, winner string) []Leftover {
	var plan []Leftover
	criuHolds := e.CRIUAlive() && heldBy(e.Root, e.CRIU)
	if e.Phase == PhaseInDoubt && !criuHolds && !resolved {
		return []Leftover{{Kind: "in-doubt", What: "migration " + e.ID,
			Why: "in doubt: the destination's log and state say which copy runs; its lock and images stay until " +
				"phaul gc --resolved " + e.ID + "=source|destination"}}
	}
	if criuHolds {
		l, inDoubt := heldTree(e, winner)
		plan = append(plan, l)
		if inDoubt {
			// Its lock and images stay with it: the operator resolves
			// the whole (README, "In doubt").
			return plan
		}
	}
	if e.NftTable != "" {
		if l, ok := lockLeftover(e, criuHolds || resolved); ok {
			plan = append(plan, l)
		}
	}
	if e.ImagesDir != "" && exists(e.ImagesDir) {
		plan = append(plan, remapLeftovers(e.ImagesDir, remapsUnneeded(e, criuHolds || resolved))...)
	}
	if l, ok := pathLeftover(workDir, e.ImagesDir, "images", "the dump's images, sent or not: no one reads them again"); ok {
		plan = append(plan, l)
		if conf := filepath.Clean(e.ImagesDir) + ".criu-lazy.conf"; exists(conf) {
			plan = append(plan, Leftover{Kind: "images", What: conf, Why: "the lazy dump's CRIU config",
				Action: "remove", apply: func() error { return os.Remove(conf) }})
		}
	}
	for _, cg := range e.Cgroups {
		plan = append(plan, cgroupLeftover(e, cg)...)
	}
	return plan
}

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

// heldBy reports whether root is traced by criu: the tree CRIU holds.
func heldBy(root, criu int) bool {
	if root <= 0 {
		return false
	}
	t, err := linux.TracerPid(root)
	return err == nil && t == criu
}

// heldTree plans what to do with a source tree a CRIU still holds after
// its phaul died. Before COMMIT was sent, the destination never ran it:
// killing CRIU resumes the tree (ptrace lets it go). Once post-copy ran
// on the destination, the held copy must never run again: the tree is
// killed first, then CRIU. At COMMIT itself, or in doubt, only the
// destination knows: left, unless the operator says which copy runs
// (winner).
func heldTree(e JournalEntry, winner string) (Leftover, bool) {
	l := Leftover{Kind: "criu", What: fmt.Sprintf("criu pid %d holding tree %d", e.CRIU, e.Root)}
	switch {
	case winner == "source" && e.Phase != PhasePostcopy:
		l.Why = "in doubt, resolved by the operator: the source's copy runs"
		l.Action = "kill CRIU: the source tree resumes"
		l.apply = func() error { return killCRIU(e) }
	case winner == "destination":
		l.Kind = "held-tree"
		l.Why = "in doubt, resolved by the operator: the destination's copy runs"
		l.Action = "kill the held tree, then CRIU"
		l.apply = func() error { return killHeldTree(e) }
	case e.Phase < PhaseCommit:
		l.Why = "CRIU holds the source tree frozen (lazy dump) for a migration that never committed"
		l.Action = "kill CRIU: the source tree resumes"
		l.apply = func() error { return killCRIU(e) }
	case e.Phase == PhasePostcopy:
		l.Kind = "held-tree"
		l.Why = "the destination's copy has run (post-copy): this frozen copy must never run again"
		l.Action = "kill the held tree, then CRIU"
		l.apply = func() error { return killHeldTree(e) }
	default:
		l.Kind = "held-tree"
		l.Why = fmt.Sprintf("in doubt (%s): the destination's log says whether it committed; then "+
			"phaul gc --resolved %s=source resumes this copy, =destination drops it", e.Phase, e.ID)
		return l, true
	}
	return l, false
}

// killCRIU kills e's CRIU (by pidfd: never a process that reused its pid)
// and waits until it is gone and its tree runs untraced.
func killCRIU(e JournalEntry) error {
	p, err := linux.PidfdOpen(e.CRIU)
	if err != nil {
		return err
	}
	defer p.Close()
	if !e.CRIUAlive() { // the pidfd may name a newer process
		return nil
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	return waitUntil(10*time.Second, func() bool {
		t, err := linux.TracerPid(e.Root)
		return !e.CRIUAlive() && (err != nil || t == 0)
	}, "criu %d still holds tree %d", e.CRIU, e.Root)
}

// killHeldTree kills every process of the tree CRIU holds, then CRIU: the
// tree is doomed before CRIU could let it go.
func killHeldTree(e JournalEntry) error {
	pfds, err := openTree(e.Root)
	if err != nil {
		return err
	}
	defer closeAll(pfds)
	if !heldBy(e.Root, e.CRIU) { // the pidfds may name newer processes
		return fmt.Errorf("tree %d is no longer held by criu %d", e.Root, e.CRIU)
	}
	for _, p := range pfds {
		if err := p.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return err
		}
	}
	if err := linux.WaitDoomed(pfds, 10*time.Second); err != nil {
		return err
	}
	return killCRIU(e)
}

// lockLeftover plans CRIU's network-lock table of e: kept after a dump
// that kills the tree (for a restore elsewhere), or after CRIU was killed
// holding the tree. CRIU's own rollback removes it. It goes once the
// tree runs here again (it only blocks it) or the destination's copy has
// run (post-copy, done); while the destination may still hold the copy in
// doubt it keeps this host from resetting the tree's connections, and
// stays until the operator says the migration is resolved (unlock: the
// tree is resumed, or the migration resolved).
func lockLeftover(e JournalEntry, unlock bool) (Leftover, bool) {
	t := linux.NftTable{Family: "inet", Name: e.NftTable}
	tables, err := linux.NftTables()
	if err != nil {
		return Leftover{Kind: "nft-table", What: t.String(), Why: "cannot list nftables: " + err.Error()}, true
	}
	if !slices.Contains(tables, t) {
		return Leftover{}, false
	}
	why := "CRIU's network lock of a dump whose tree is gone"
	alive, _ := linux.ProcessExists(e.Root)
	switch {
	case alive:
		why = "CRIU's network lock, left when its CRIU was killed: the tree's connections are blocked"
	case !unlock && e.Phase != PhasePostcopy && e.Phase != PhaseDone:
		return Leftover{Kind: "nft-table", What: t.String(), Why: "CRIU's network lock of a dump whose tree is gone, " +
			"while the destination may hold its copy in doubt: kept (phaul gc --resolved " + e.ID + "=source|destination once resolved)"}, true
	}
	return Leftover{Kind: "nft-table", What: t.String(), Why: why, Action: "delete the table",
		apply: func() error {
			if err := linux.DeleteNftTable(t); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			return nil
		}}, true
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

// remapsUnneeded reports whether the link remaps of e's dump can go: as
// its lock (lockLeftover), once the tree runs here again or the
// destination's copy has run, or the operator resolved the migration;
// while the destination may still restore a copy in doubt (on storage
// both hosts share) they stay.
func remapsUnneeded(e JournalEntry, unlock bool) bool {
	alive, _ := linux.ProcessExists(e.Root)
	return alive || unlock || e.Phase == PhasePostcopy || e.Phase == PhaseDone || e.Phase < PhasePrepared
}

// dumpLeftovers plans what a dump in dir left for a restore that will
// never happen: its link remaps and its network lock.
func dumpLeftovers(dir string) ([]Leftover, error) {
	if _, err := os.Stat(filepath.Join(dir, "inventory.img")); err != nil {
		return nil, fmt.Errorf("gc: %s is no dump's images dir: %w", dir, err)
	}
	plan := remapLeftovers(dir, true)
	if table := networkLockTable(dir); table != "" {
		t := linux.NftTable{Family: "inet", Name: table}
		tables, err := linux.NftTables()
		if err != nil {
			return nil, fmt.Errorf("gc: %w", err)
		}
		if slices.Contains(tables, t) {
			plan = append(plan, Leftover{Kind: "nft-table", What: t.String(), Why: "CRIU's network lock of the dump in " + dir,
				Action: "delete the table", apply: func() error { return ignoreNotExist(linux.DeleteNftTable(t)) }})
		}
	}
	for i := range plan {
		plan[i].Role = "dump"
	}
	return plan, nil
}

// remapLeftovers plans the link remaps the dump in dir made that still
// exist. Only links in this mount namespace (the dumped tree shared it:
// CRIU recorded no mount) named link_remap.N are removed, with unlink
// (never followed).
func remapLeftovers(dir string, remove bool) []Leftover {
	remaps, err := images.ReadLinkRemaps(dir)
	if err != nil {
		return []Leftover{{Kind: "link-remap", What: dir, Why: "cannot read the dump's link remaps: " + err.Error()}}
	}
	var plan []Leftover
	for _, r := range remaps {
		l := Leftover{Kind: "link-remap", What: r.Path, Why: "CRIU's hard link to an unlinked open file, kept for a restore"}
		switch fi, err := os.Lstat(r.Path); {
		case r.MntID >= 0:
			l.What = fmt.Sprintf("%s on mount %d of the tree's mount namespace", r.Path, r.MntID)
			l.Why += ": in another mount namespace, remove it from there"
		case !linkRemapName.MatchString(filepath.Base(r.Path)) || !filepath.IsAbs(r.Path):
			l.Why += ": not named link_remap.N, left alone"
		case err != nil:
			continue // gone
		case !fi.Mode().IsRegular():
			l.Why += ": not a regular file, left alone"
		case !remove:
			l.Why += "; the destination may still restore from it (in doubt)"
		default:
			path := r.Path
			l.Action = "remove"
			l.apply = func() error { return ignoreNotExist(os.Remove(path)) }
		}
		plan = append(plan, l)
	}
	return plan
}

var linkRemapName = regexp.MustCompile(`^link_remap\.[0-9]+$`)

func ignoreNotExist(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

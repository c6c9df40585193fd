package phaul

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
)

// What a dump leaves on the source, and how gc resolves it: the tree CRIU
// may still hold, CRIU's network lock, its link remaps.

// sourceLeftovers plans the source side of e: its held tree first (what
// CRIU holds decides everything else), then CRIU's network lock, the
// images, the throttle cgroup.
func sourceLeftovers(workDir string, e JournalEntry, resolved bool, winner string) []Leftover {
	var plan []Leftover
	hold, holdProcs := sourceHold(e)
	// The tree is held: by its CRIU, or frozen in phaul's hold cgroup
	// (whatever became of CRIU, it cannot run).
	held := e.CRIUAlive() && heldBy(e.Root, e.CRIU) || holdProcs > 0
	if hold != nil && holdProcs == 0 {
		plan = append(plan, Leftover{Kind: "cgroup", What: hold.Dir(), Why: "the source's hold cgroup, empty",
			Action: "remove", apply: func() error { return hold.Kill(time.Second) }})
	}
	if e.Phase == PhaseInDoubt && !held && !resolved {
		return []Leftover{{Kind: "in-doubt", What: "migration " + e.ID,
			Why: "in doubt: the destination's log and state say which copy runs; its lock and images stay until " +
				"phaul gc --resolved " + e.ID + "=source|destination"}}
	}
	if held {
		l, inDoubt := heldTree(e, winner)
		plan = append(plan, l)
		if inDoubt {
			// Its lock and images stay with it: the operator resolves
			// the whole (README, "In doubt").
			return plan
		}
	}
	if e.NftTable != "" {
		if l, ok := lockLeftover(e, held || resolved); ok {
			plan = append(plan, l)
		}
	}
	if e.ImagesDir != "" && exists(e.ImagesDir) {
		plan = append(plan, remapLeftovers(e.ImagesDir, remapsUnneeded(e, held || resolved))...)
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
	return append(plan, trackerLeftovers(e)...)
}

// trackerLeftovers lists the userfaultfd state a dirty-page tracker left
// in the tree's running processes (a descriptor, a mapping registered for
// write protection). phaul's tracker holds the only descriptor, so its
// death releases everything; a tracker killed inside its 15-30 µs
// injection window is the exception. Listed, not removed: taking it out
// means injecting into the task.
func trackerLeftovers(e JournalEntry) []Leftover {
	if e.Root <= 0 || heldBy(e.Root, e.CRIU) {
		return nil
	}
	if st, err := linux.ReadProcessStat(e.Root); err != nil || st.StartTicks > e.OwnerStart {
		return nil // gone, or the pid names a process newer than the migration
	}
	pids, err := treePids(e.Root)
	if err != nil {
		return nil
	}
	var plan []Leftover
	for _, pid := range pids {
		left, err := dirty.Leftovers(pid)
		if err != nil {
			continue
		}
		for _, l := range left {
			plan = append(plan, Leftover{Kind: "tracker", What: fmt.Sprintf("pid %d: %s", pid, l),
				Why: "userfaultfd tracking state in a task of the migrated tree (a tracker killed while injecting); " +
					"CRIU cannot dump a task holding a userfaultfd: restart the task, or remove it by hand"})
		}
	}
	return plan
}

// heldBy reports whether root is traced by criu: the tree CRIU holds.
func heldBy(root, criu int) bool {
	if root <= 0 || criu <= 0 {
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
	if !e.CRIUAlive() || !heldBy(e.Root, e.CRIU) {
		l.What = fmt.Sprintf("tree %d frozen in phaul/%s (its CRIU is gone)", e.Root, e.Hold)
	}
	switch {
	case winner == "source" && e.Phase != PhasePostcopy:
		l.Why = "in doubt, resolved by the operator: the source's copy runs"
		l.Action = "let the source tree go (kill CRIU, thaw it where it was): it resumes"
		l.apply = func() error { return resumeSource(e) }
	case winner == "destination":
		l.Kind = "held-tree"
		l.Why = "in doubt, resolved by the operator: the destination's copy runs"
		l.Action = "kill the held tree, then CRIU"
		l.apply = func() error { return killHeldTree(e) }
	case e.Phase < PhaseCommit:
		l.Why = "the source tree is held frozen (lazy dump) for a migration that never committed"
		l.Action = "let the source tree go (kill CRIU, thaw it where it was): it resumes"
		l.apply = func() error { return resumeSource(e) }
	case e.Phase == PhasePostcopy:
		// Killing it would lose what the destination still lacks.
		l.Kind = "held-tree"
		l.Why = fmt.Sprintf("post-copy whose phaul died: the destination runs and may still wait for pages only this frozen "+
			"copy has: phaul recover --work-dir DIR %s serves them, then drops it; once the destination has them or gave up, "+
			"phaul gc --resolved %s=destination drops it (it must never run again)", e.ID, e.ID)
		return l, true
	default:
		l.Kind = "held-tree"
		l.Why = fmt.Sprintf("in doubt (%s): the destination's log says whether it committed; then "+
			"phaul gc --resolved %s=source resumes this copy, =destination drops it", e.Phase, e.ID)
		return l, true
	}
	return l, false
}

// sourceHold opens e's hold cgroup (freezehold.go) if it is left, and
// counts the processes it holds frozen.
func sourceHold(e JournalEntry) (*cgroup.Hold, int) {
	if e.Hold == "" {
		return nil, 0
	}
	h, err := cgroup.OpenHold(e.Hold, e.HoldBack)
	if err != nil || h == nil {
		return nil, 0
	}
	procs, _ := h.Procs()
	return h, len(procs)
}

// resumeSource lets e's held tree run again: its CRIU killed (by pidfd:
// never a process that reused its pid) lets it go, then it leaves phaul's
// hold cgroup for the cgroup it came from.
func resumeSource(e JournalEntry) error {
	if e.CRIUAlive() {
		if err := killCRIU(e); err != nil {
			return err
		}
	}
	if h, _ := sourceHold(e); h != nil {
		return h.Release()
	}
	return nil
}

// killCRIU kills e's CRIU and waits until it is gone and no longer traces
// its tree.
func killCRIU(e JournalEntry) error {
	if err := killExact(e.CRIU, e.CRIUStart); err != nil {
		return err
	}
	return waitUntil(10*time.Second, func() bool {
		t, err := linux.TracerPid(e.Root)
		return !e.CRIUAlive() && (err != nil || t != e.CRIU)
	}, "criu %d still holds tree %d", e.CRIU, e.Root)
}

// killHeldTree kills every process of the held tree, then its CRIU: the
// tree is doomed before CRIU could let it go. A tree frozen in phaul's
// hold dies there (SIGKILL, then thawed).
func killHeldTree(e JournalEntry) error {
	if h, n := sourceHold(e); n > 0 {
		if err := h.Kill(10 * time.Second); err != nil {
			return err
		}
		if e.CRIUAlive() {
			return killCRIU(e)
		}
		return nil
	}
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
	present, err := nftPresent(t)
	if err != nil {
		return Leftover{Kind: "nft-table", What: t.String(), Why: "cannot list nftables: " + err.Error()}, true
	}
	if !present {
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
	return nftLeftover(t, why), true
}

// nftPresent reports whether table t exists in this network namespace.
func nftPresent(t linux.NftTable) (bool, error) {
	tables, err := linux.NftTables()
	return slices.Contains(tables, t), err
}

// nftLeftover plans deleting CRIU's lock table t.
func nftLeftover(t linux.NftTable, why string) Leftover {
	return Leftover{Kind: "nft-table", What: t.String(), Why: why, Action: "delete the table",
		apply: func() error { return ignoreNotExist(linux.DeleteNftTable(t)) }}
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
		present, err := nftPresent(t)
		if err != nil {
			return nil, fmt.Errorf("gc: %w", err)
		}
		if present {
			plan = append(plan, nftLeftover(t, "CRIU's network lock of the dump in "+dir))
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

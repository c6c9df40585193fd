package phaul

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/lazy"
)

// A destination's restored tree held inside CRIU's restore (rebuilt,
// never run) outlives the service that restored it: CRIU keeps its own
// copy of the service's RPC end (heldRestore). Whoever finds it later
// (phaul gc, a service that starts) resumes or drops it through that copy,
// as named by the journal entry.

// resumeHeld resumes e's held tree: its memory made whole first (a lazy
// restore whose daemon died left its lazy ranges empty: they are written
// from the images), moved to its cgroup parent, then let run by CRIU.
func resumeHeld(workDir string, e JournalEntry) error {
	if !e.CRIUAlive() {
		return fmt.Errorf("held tree %d: its criu %d is gone", e.Root, e.CRIU)
	}
	if e.Lazy && e.Memory != memoryComplete {
		// Its helper, if it still runs, keeps the tree's userfaultfds
		// open: a write to a missing page would wait for it.
		if err := stopHelper(e); err != nil {
			return fmt.Errorf("held tree: %w", err)
		}
		pids, err := treeVpids(e.Root)
		if err != nil {
			return fmt.Errorf("held tree: %w", err)
		}
		images := filepath.Join(workDir, e.ID, "images")
		if _, err := lazy.Refill(context.Background(), images, pids); err != nil {
			return fmt.Errorf("held tree %d cannot be made whole (its pages are not all here), left held: %w", e.Root, err)
		}
	}
	if g, err := cgroup.Open(e.ID); err == nil {
		if err := g.MoveAll(e.CgroupParent); err != nil {
			return fmt.Errorf("held tree: %w", err)
		}
	}
	resp, err := criu.AnswerHeld(e.CRIU, e.CRIUPeerFD, true, time.Minute)
	if err != nil {
		return err
	}
	if !resp.GetSuccess() {
		return fmt.Errorf("held tree %d: criu failed to resume it (see %s)", e.Root, filepath.Join(workDir, e.ID, "restore.log"))
	}
	return removeRestore(workDir, e)
}

// dropHeld has CRIU kill e's held tree (what is left in its cgroup is
// killed too) and removes its files.
func dropHeld(workDir string, e JournalEntry) error {
	if err := stopHelper(e); err != nil {
		return err
	}
	if e.CRIUAlive() {
		if _, err := criu.AnswerHeld(e.CRIU, e.CRIUPeerFD, false, time.Minute); err != nil && e.CRIUAlive() {
			return err
		}
	}
	if g, err := cgroup.Open(e.ID); err == nil {
		if err := g.Kill(5 * time.Second); err != nil {
			return err
		}
	}
	return removeRestore(workDir, e)
}

// stopHelper kills e's lazy-pages helper, if it still runs, and waits
// until it is gone (with it the tree's userfaultfds), then removes its
// cgroup.
func stopHelper(e JournalEntry) error {
	if e.HelperAlive() {
		if err := killExact(e.LazyHelper, e.LazyHelperStart); err != nil {
			return fmt.Errorf("lazy-pages helper: %w", err)
		}
	}
	if g, err := cgroup.Open(lazyGroupName(e.ID)); err == nil {
		return g.Remove()
	}
	return nil
}

// removeRestore removes e's cgroups (empty by now) and directory.
func removeRestore(workDir string, e JournalEntry) error {
	var errs []error
	for _, name := range []string{e.ID, lazyGroupName(e.ID)} {
		if g, err := cgroup.Open(name); err == nil {
			errs = append(errs, g.Remove())
		} else if !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, os.RemoveAll(filepath.Join(workDir, e.ID)))
	return errors.Join(errs...)
}

// treeVpids maps each process of root's tree to its pid in the tree's
// own PID namespace (the ids its images use) from its pid here.
func treeVpids(root int) (map[uint32]int, error) {
	pids, err := treePids(root)
	if err != nil {
		return nil, err
	}
	m := make(map[uint32]int, len(pids))
	for _, pid := range pids {
		v, err := nsPid(pid)
		if err != nil {
			return nil, err
		}
		m[uint32(v)] = pid
	}
	return m, nil
}

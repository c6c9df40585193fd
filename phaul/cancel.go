package phaul

import (
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// Cancel rolls back migration id as QEMU's migrate_cancel does: the phaul
// migrate that drives it (named by workDir's journal) gets SIGTERM, which
// it answers as SIGINT: before COMMIT it rolls back (the tree runs on at
// the source, the destination drops its copy); from COMMIT on it refuses.
// Cancel waits up to timeout for the migration to end and returns where
// it stood last and whether the source's tree still runs.
func Cancel(workDir, id string, timeout time.Duration) (last Phase, sourceRuns bool, err error) {
	dir := JournalDir(workDir)
	e, err := ReadEntry(dir, id, RoleSource)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return 0, false, fmt.Errorf("cancel: no migration %s in %s (phaul cancel runs where phaul migrate runs, with its --work-dir)", id, workDir)
	case err != nil:
		return 0, false, fmt.Errorf("cancel: %w", err)
	case !e.OwnerAlive():
		return e.Phase, false, fmt.Errorf("cancel: the phaul of migration %s (pid %d) is gone, at %s: phaul gc --work-dir %s resolves what it left", id, e.Owner, e.Phase, workDir)
	case e.Phase >= PhaseCommit:
		return e.Phase, false, fmt.Errorf("cancel: migration %s is at %s: past COMMIT the destination's copy may run; it cannot be rolled back", id, e.Phase)
	}
	p, err := linux.PidfdOpen(e.Owner)
	if err != nil {
		return e.Phase, false, fmt.Errorf("cancel: %w", err)
	}
	defer p.Close()
	if !e.OwnerAlive() { // the pidfd may name a process that reused the pid
		return e.Phase, false, fmt.Errorf("cancel: the phaul of migration %s ended meanwhile", id)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return e.Phase, false, fmt.Errorf("cancel: %w", err)
	}
	last = e.Phase
	deadline := time.Now().Add(timeout)
	for {
		cur, err := ReadEntry(dir, id, RoleSource)
		if errors.Is(err, fs.ErrNotExist) || (err == nil && (cur.Phase.Final() || !cur.OwnerAlive())) {
			if err == nil {
				last = cur.Phase
			}
			break
		}
		if err == nil {
			last = cur.Phase
		}
		if time.Now().After(deadline) {
			return last, false, fmt.Errorf("cancel: migration %s still at %s after %v", id, last, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	alive, _ := linux.ProcessExists(e.Root)
	return last, alive, nil
}

package phaul

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
)

// The source's frozen hold. A lazily dumped tree is held by CRIU, and a
// CRIU killed lets it go: it would run again beside a destination copy
// that may already run. So before COMMIT the tree also goes into a frozen
// cgroup of phaul's (cgroup.Hold), where it stays stopped whatever CRIU
// does; from then on only phaul decides: killed once the destination has
// committed (and, in post-copy, has every page), released (moved back,
// runs on) on a rollback. Without a freezer the hold is skipped, and a
// pre-copy ends its copy at PREPARED instead (docs/protocol.md §6).

// errTreeRan: a process of the dumped tree was not CRIU's tracee once
// frozen: it may have run since its dump, which is then stale.
var errTreeRan = errors.New("the dumped tree may have run since its dump")

// holdTree moves the held tree into its frozen cgroup (recorded in the
// journal first), then checks it was held by CRIU all along.
func (r *dumpRun) holdTree() error {
	s := r.s
	all, err := treePids(s.cfg.PID)
	if err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	// A zombie never runs again, and CRIU does not trace it.
	pids := slices.DeleteFunc(all, memoryless)
	h, err := cgroup.NewHold(s.stats.MigrationID+"-hold", pids)
	if err != nil {
		return err
	}
	if err := s.j.record(func(e *JournalEntry) { e.Hold, e.HoldBack = h.Name(), h.Origin() }); err != nil {
		return err
	}
	t0 := time.Now()
	if err := h.Freeze(pids); err != nil {
		return err
	}
	r.hold = h
	for _, pid := range pids {
		if t, err := linux.TracerPid(pid); err != nil || t != s.criuPID {
			return fmt.Errorf("hold: process %d traced by %d, not criu %d (%v): %w", pid, t, s.criuPID, err, errTreeRan)
		}
	}
	s.stats.HoldMS = ms(time.Since(t0))
	s.log.Debug("source tree held in a frozen cgroup", "group", h.Dir(), "processes", len(pids), "hold_ms", s.stats.HoldMS)
	return nil
}

// killHold kills the held tree: it never runs again.
func (r *dumpRun) killHold() {
	if r.hold == nil {
		return
	}
	// Never released after this, whatever happens: the destination's copy
	// may run.
	h := r.hold
	r.hold = nil
	if err := h.Kill(r.s.cfg.CommitTimeout); err != nil {
		r.s.log.Error("kill the held source tree: it stays frozen there; kill its processes, then thaw and remove the group",
			"group", h.Dir(), "err", err)
	}
}

// releaseHold lets the tree run again where it was.
func (r *dumpRun) releaseHold() {
	if r.hold == nil {
		return
	}
	if err := r.hold.Release(); err != nil {
		r.s.log.Error("release the held source tree: it stays frozen; phaul gc moves it back", "group", r.hold.Dir(), "err", err)
		return
	}
	r.hold = nil
}

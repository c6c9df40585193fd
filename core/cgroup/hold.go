package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// Hold keeps a process tree stopped in a frozen cgroup phaul creates,
// phaul/<name> of the freezer v1 hierarchy (the cgroup v2 one where v1 has
// no freezer). A tree frozen there stays stopped whatever its tracer does:
// measured with CRIU 4.2.1 on Linux 6.18, a tree held by CRIU's lazy dump
// and frozen in such a group neither runs when CRIU is killed nor when it
// resumes it; it runs again only once it leaves the group (Release) or
// the group thaws. So a source copy that must never run again (its
// destination may run) does not depend on CRIU staying alive.
//
// Only phaul's group is written, besides the cgroup.procs of each
// process's own group on the way back (Release).
type Hold struct {
	root string         // the hierarchy's mount point
	dir  string         // phaul/<name> in it
	v1   bool           // freezer v1 (freezer.state), else cgroup v2 (cgroup.freeze)
	orig map[int]string // pid: its cgroup before, relative to root
	def  string         // the root process's: for a process not recorded
}

// holdTimeout bounds the wait for the kernel to report the group frozen.
const holdTimeout = 5 * time.Second

// NewHold prepares a hold for the tree of pids (the first is the root): it
// records where each process is, and touches no cgroup yet (Freeze).
func NewHold(name string, pids []int) (*Hold, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("hold cgroup %q: bad name", name)
	}
	h := &Hold{orig: make(map[int]string)}
	if root, err := linux.FreezerV1Root(); err == nil {
		h.root, h.v1 = root, true
	} else if root, err2 := linux.Cgroup2Root(); err2 == nil && linux.HaveFreezerV2() == nil {
		h.root = root
	} else {
		return nil, fmt.Errorf("hold: no freezer: %w", errors.Join(err, err2))
	}
	h.dir = filepath.Join(h.root, Parent, name)
	for _, pid := range pids {
		p, err := h.processCgroup(pid)
		if err != nil {
			return nil, fmt.Errorf("hold: %w", err)
		}
		h.orig[pid] = p
	}
	if len(pids) > 0 {
		h.def = h.orig[pids[0]]
	}
	return h, nil
}

// Freeze moves the tree into phaul/<name> and freezes it; it returns once
// every task is frozen. On an error nothing is left: the processes are
// back where they were.
func (h *Hold) Freeze(pids []int) error {
	parent := filepath.Dir(h.dir)
	if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("hold: create %s: %w", parent, err)
	}
	if err := os.Mkdir(h.dir, 0o755); err != nil {
		removeParent(h.root)
		return fmt.Errorf("hold: create %s: %w", h.dir, err)
	}
	if err := h.freeze(pids); err != nil {
		return errors.Join(err, h.Release())
	}
	return nil
}

// OpenHold returns the hold phaul/<name> left by a phaul that is gone, for
// Release or Kill; back is the cgroup (relative to the hierarchy's root)
// its processes return to. Nil when no such group exists.
func OpenHold(name, back string) (*Hold, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("hold cgroup %q: bad name", name)
	}
	for _, find := range []func() (string, error){linux.FreezerV1Root, linux.Cgroup2Root} {
		root, err := find()
		if err != nil {
			continue
		}
		dir := filepath.Join(root, Parent, name)
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			_, err := os.Stat(filepath.Join(dir, "freezer.state"))
			return &Hold{root: root, dir: dir, v1: err == nil, orig: map[int]string{}, def: back}, nil
		}
	}
	return nil, nil
}

// Name is the hold's group, phaul/<name> of its hierarchy.
func (h *Hold) Name() string { return filepath.Base(h.dir) }

// Dir is the hold's cgroup directory.
func (h *Hold) Dir() string { return h.dir }

// Origin is the cgroup the tree's root came from, relative to the
// hierarchy's root: where a hold left behind moves its processes back.
func (h *Hold) Origin() string { return h.def }

// processCgroup returns pid's cgroup in the hold's hierarchy.
func (h *Hold) processCgroup(pid int) (string, error) {
	if h.v1 {
		return linux.ProcessCgroupV1(pid, "freezer")
	}
	return linux.ProcessCgroup2(pid)
}

// freeze moves pids in and freezes the group.
func (h *Hold) freeze(pids []int) error {
	for _, pid := range pids {
		if err := write(h.dir, "cgroup.procs", int64(pid)); err != nil && !processGone(pid) {
			return fmt.Errorf("hold: %w", err)
		}
	}
	if err := h.setFrozen(true); err != nil {
		return err
	}
	for deadline := time.Now().Add(holdTimeout); ; {
		frozen, err := h.frozen()
		if err != nil {
			return err
		}
		if frozen {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("hold: %s not frozen after %v", h.dir, holdTimeout)
		}
		time.Sleep(time.Millisecond) // the v1 freezer has no event to wait for
	}
}

func (h *Hold) setFrozen(frozen bool) error {
	file, v := "cgroup.freeze", "0"
	if frozen {
		v = "1"
	}
	if h.v1 {
		file, v = "freezer.state", "THAWED"
		if frozen {
			v = "FROZEN"
		}
	}
	if err := os.WriteFile(filepath.Join(h.dir, file), []byte(v), 0); err != nil {
		return fmt.Errorf("hold: write %s/%s: %w", h.dir, file, err)
	}
	return nil
}

// frozen reports whether every task in the group is frozen.
func (h *Hold) frozen() (bool, error) {
	if h.v1 {
		b, err := os.ReadFile(filepath.Join(h.dir, "freezer.state"))
		if err != nil {
			return false, fmt.Errorf("hold: %w", err)
		}
		return strings.TrimSpace(string(b)) == "FROZEN", nil
	}
	b, err := os.ReadFile(filepath.Join(h.dir, "cgroup.events"))
	if err != nil {
		return false, fmt.Errorf("hold: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "frozen 1" {
			return true, nil
		}
	}
	return false, nil
}

// Procs lists the processes the hold holds.
func (h *Hold) Procs() ([]int, error) { return readProcs(h.dir) }

// Release moves every process back to the cgroup it came from, which lets
// it run again (unless its tracer still stops it), and removes the group.
func (h *Hold) Release() error {
	for attempt := 0; ; attempt++ {
		pids, err := readProcs(h.dir)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("hold release: %w", err)
		}
		if len(pids) == 0 {
			break
		}
		if attempt == 10 {
			return fmt.Errorf("hold release: %d processes stay in %s", len(pids), h.dir)
		}
		var errs []error
		for _, pid := range pids {
			p, ok := h.orig[pid]
			if !ok {
				p = h.def
			}
			if err := write(filepath.Join(h.root, p), "cgroup.procs", int64(pid)); err != nil && !processGone(pid) {
				errs = append(errs, err)
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("hold release: %w", errors.Join(errs...))
		}
	}
	return h.remove()
}

// Kill kills every process the hold holds (a frozen v1 task dies only once
// thawed: the group thaws after every process has SIGKILL pending, so none
// can run user code again) and removes the group once they are gone.
func (h *Hold) Kill(timeout time.Duration) error {
	pids, err := readProcs(h.dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("hold kill: %w", err)
	}
	for _, pid := range pids {
		// Frozen, the tasks cannot exit: their pids are not reused.
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("hold kill %d: %w", pid, err)
		}
	}
	if err := h.setFrozen(false); err != nil {
		return err
	}
	for deadline := time.Now().Add(timeout); ; {
		pids, err := readProcs(h.dir)
		if err != nil {
			return fmt.Errorf("hold kill: %w", err)
		}
		if len(pids) == 0 {
			return h.remove()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("hold kill: %d processes survive SIGKILL in %s", len(pids), h.dir)
		}
		time.Sleep(10 * time.Millisecond) // exit is asynchronous; no event here
	}
}

func (h *Hold) remove() error {
	if err := rmdir(h.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("hold: remove %s: %w", h.dir, err)
	}
	removeParent(h.root)
	return nil
}

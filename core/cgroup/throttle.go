package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// throttlePeriod is the CFS period of a Throttle's group.
const throttlePeriod = 100 * time.Millisecond

// minQuota is the smallest CFS quota the kernel takes (1 ms).
const minQuota = time.Millisecond

// Throttle caps the CPU time of a process tree with the cgroup v1 cpu
// controller, as QEMU's auto-converge throttles vCPUs: Set moves the tree
// into phaul/<name> of the cpu hierarchy, a group phaul creates, and
// lowers its CFS quota to a share of what the tree used before; Release
// moves every process back to the cpu cgroup it came from and removes the
// group. Only phaul's group is ever written, besides the cgroup.procs of
// each process's own group on the way back.
type Throttle struct {
	name string
	root string         // the cpu hierarchy's mount point
	dir  string         // phaul/<name> in it; "" before the first Set
	orig map[int]string // pid: its cpu cgroup before, relative to root
	def  string         // for a process born inside the group: the root process's
	pct  int
}

// NewThrottle prepares a throttle for the tree of pids (the first is the
// root) without touching any cgroup yet. It fails when no v1 cpu
// hierarchy is mounted.
func NewThrottle(name string, pids []int) (*Throttle, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("throttle cgroup %q: bad name", name)
	}
	root, err := linux.CPUV1Root()
	if err != nil {
		return nil, fmt.Errorf("throttle: %w", err)
	}
	t := &Throttle{name: name, root: root, orig: make(map[int]string)}
	if err := t.track(pids); err != nil {
		return nil, err
	}
	if len(pids) > 0 {
		t.def = t.orig[pids[0]]
	}
	return t, nil
}

// track records the cpu cgroup of processes not seen before.
func (t *Throttle) track(pids []int) error {
	for _, pid := range pids {
		if _, ok := t.orig[pid]; ok {
			continue
		}
		p, err := linux.ProcessCgroupV1(pid, "cpu")
		if err != nil {
			if !processGone(pid) {
				return fmt.Errorf("throttle: %w", err)
			}
			continue
		}
		if t.dir != "" && filepath.Join(t.root, p) == t.dir {
			p = t.def // born inside the group
		}
		t.orig[pid] = p
	}
	return nil
}

// Group is the throttle's group, relative to the cpu hierarchy's root.
func (t *Throttle) Group() string { return filepath.Join(Parent, t.name) }

// Origin is the cpu cgroup the tree's root came from (relative to the
// root of the hierarchy): where ReleaseThrottle moves a tree back.
func (t *Throttle) Origin() string { return t.def }

// ReleaseThrottle does what Release does for a Throttle that is gone (its
// phaul was killed): every process in group (phaul/NAME, relative to the
// cpu hierarchy's root) moves to back, and the group goes. Nothing to do
// when the group does not exist.
func ReleaseThrottle(group, back string) error {
	name, ok := strings.CutPrefix(group, Parent+"/")
	if !ok || name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return fmt.Errorf("throttle cgroup %q: not phaul's", group)
	}
	root, err := linux.CPUV1Root()
	if err != nil {
		return fmt.Errorf("throttle: %w", err)
	}
	t := &Throttle{name: name, root: root, dir: filepath.Join(root, group), def: back}
	if _, err := os.Stat(t.dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return t.Release()
}

// Percent is the throttle set last: the share of the tree's CPU time taken
// away, 0 before the first Set.
func (t *Throttle) Percent() int { return t.pct }

// Set throttles the tree of pids by pct percent (1 to 99) of cores, the CPU
// the tree used unthrottled (in cores: 1.0 is one CPU busy).
func (t *Throttle) Set(pids []int, pct int, cores float64) error {
	if pct < 1 || pct > 99 {
		return fmt.Errorf("throttle %d%%: out of 1..99", pct)
	}
	if err := t.track(pids); err != nil {
		return err
	}
	if t.dir == "" {
		parent := filepath.Join(t.root, Parent)
		if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("throttle: create %s: %w", parent, err)
		}
		dir := filepath.Join(parent, t.name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			return fmt.Errorf("throttle: create %s: %w", dir, err)
		}
		t.dir = dir
		if err := write(dir, "cpu.cfs_period_us", throttlePeriod.Microseconds()); err != nil {
			return err
		}
	}
	quota := max(time.Duration(float64(throttlePeriod)*cores*float64(100-pct)/100), minQuota)
	if err := write(t.dir, "cpu.cfs_quota_us", quota.Microseconds()); err != nil {
		return err
	}
	for _, pid := range pids {
		if err := write(t.dir, "cgroup.procs", int64(pid)); err != nil && !processGone(pid) {
			return err
		}
	}
	t.pct = pct
	return nil
}

// Release moves every process in the group back to the cpu cgroup it came
// from and removes the group. A no-op before the first Set.
func (t *Throttle) Release() error {
	if t.dir == "" {
		return nil
	}
	var errs []error
	for attempt := 0; ; attempt++ {
		pids, err := readProcs(t.dir)
		if err != nil {
			return fmt.Errorf("throttle release: %w", err)
		}
		if len(pids) == 0 {
			break
		}
		if attempt == 10 {
			return fmt.Errorf("throttle release: %d processes stay in %s", len(pids), t.dir)
		}
		for _, pid := range pids {
			p, ok := t.orig[pid]
			if !ok {
				p = t.def
			}
			if err := write(filepath.Join(t.root, p), "cgroup.procs", int64(pid)); err != nil && !processGone(pid) {
				errs = append(errs, err)
			}
		}
		if len(errs) > 0 {
			return fmt.Errorf("throttle release: %w", errors.Join(errs...))
		}
	}
	if err := os.Remove(t.dir); err != nil {
		return fmt.Errorf("throttle release: %w", err)
	}
	removeParent(t.root)
	t.dir = ""
	return nil
}

func write(dir, file string, v int64) error {
	if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(v, 10)), 0); err != nil {
		return fmt.Errorf("write %s/%s: %w", dir, file, err)
	}
	return nil
}

// processGone reports whether pid is known to have exited.
func processGone(pid int) bool {
	alive, err := linux.ProcessExists(pid)
	return err == nil && !alive
}

// TreeCPU returns the CPU time the processes used so far, all threads.
func TreeCPU(pids []int) time.Duration {
	var ticks uint64
	for _, pid := range pids {
		if st, err := linux.ReadProcessStat(pid); err == nil {
			ticks += st.CPUTicks
		}
	}
	return time.Duration(ticks) * time.Second / linux.UserHZ
}

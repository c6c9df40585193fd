package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// Parent is the directory phaul owns in each hierarchy.
const Parent = "phaul"

// ErrNoHierarchy is returned by Create when neither hierarchy is mounted.
var ErrNoHierarchy = errors.New("cgroup: no freezer v1 or cgroup v2 hierarchy mounted")

// Group is one phaul/<name> cgroup in every mounted hierarchy.
type Group struct {
	Name  string
	Paths []string // absolute directories, one per hierarchy
	roots []string // the hierarchy of each path, its mount point
}

// roots lists the hierarchies phaul uses: the freezer v1 and cgroup v2
// ones, or with all every mounted hierarchy.
func roots(all bool) []string {
	if all {
		rs, err := linux.CgroupRoots()
		if err == nil {
			return rs
		}
	}
	var rs []string
	if p, err := linux.FreezerV1Root(); err == nil {
		rs = append(rs, p)
	}
	if p, err := linux.Cgroup2Root(); err == nil {
		rs = append(rs, p)
	}
	return rs
}

// Create makes phaul/<name> in the freezer v1 and the cgroup v2 hierarchy.
// An existing group of that name is an error (it is not ours to reuse).
func Create(name string) (*Group, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup %q: bad name", name)
	}
	rs := roots(false)
	if len(rs) == 0 {
		return nil, ErrNoHierarchy
	}
	g := &Group{Name: name}
	for _, r := range rs {
		parent := filepath.Join(r, Parent)
		if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			g.Remove()
			return nil, fmt.Errorf("create cgroup %s: %w", parent, err)
		}
		dir := filepath.Join(parent, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			removeParent(r)
			g.Remove()
			return nil, fmt.Errorf("create cgroup %s: %w", dir, err)
		}
		g.Paths = append(g.Paths, dir)
		g.roots = append(g.roots, r)
	}
	return g, nil
}

// Open returns the existing group phaul/<name> in every hierarchy that has
// it (for cleanup, gc and inspection).
func Open(name string) (*Group, error) {
	g := &Group{Name: name}
	for _, r := range roots(true) {
		dir := filepath.Join(r, Parent, name)
		if st, err := os.Stat(dir); err == nil && st.IsDir() {
			g.Paths = append(g.Paths, dir)
			g.roots = append(g.roots, r)
		}
	}
	if len(g.Paths) == 0 {
		return nil, fmt.Errorf("cgroup %s: %w", name, os.ErrNotExist)
	}
	return g, nil
}

// Add moves process pid (all its threads) into the group in every hierarchy.
func (g *Group) Add(pid int) error {
	for _, dir := range g.Paths {
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("add %d to cgroup %s: %w", pid, dir, err)
		}
	}
	return nil
}

// Procs lists the processes in the group (from its first hierarchy).
func (g *Group) Procs() ([]int, error) {
	if len(g.Paths) == 0 {
		return nil, nil
	}
	pids, err := readProcs(g.Paths[0])
	if err != nil {
		return nil, fmt.Errorf("list cgroup: %w", err)
	}
	return pids, nil
}

// readProcs lists the processes of the cgroup at dir.
func readProcs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%s/cgroup.procs: bad pid %q", dir, f)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// Signal sends sig to every process in the group.
func (g *Group) Signal(sig syscall.Signal) error {
	pids, err := g.Procs()
	if err != nil {
		return err
	}
	var errs []error
	for _, pid := range pids {
		if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("signal %d: %w", pid, err))
		}
	}
	return errors.Join(errs...)
}

// Kill SIGKILLs every process in the group and waits up to timeout for the
// group to empty.
func (g *Group) Kill(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if err := g.Signal(syscall.SIGKILL); err != nil {
			return err
		}
		pids, err := g.Procs()
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: %d processes survive SIGKILL", g.Name, len(pids))
		}
		time.Sleep(10 * time.Millisecond) // exit of killed tasks is asynchronous
	}
}

// Remove deletes the group's directories, children first (CRIU may have
// created some below it), and phaul's own parent directory in a hierarchy
// where no other group is left in it; it fails while processes remain.
func (g *Group) Remove() error {
	var errs []error
	for i, dir := range g.Paths {
		if err := removeTree(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dir, err))
			continue
		}
		if i < len(g.roots) {
			removeParent(g.roots[i])
		}
	}
	return errors.Join(errs...)
}

// removeParent removes phaul's directory in the hierarchy at root if it
// holds no group any more. Another migration's group in it makes rmdir
// fail (EBUSY, ENOTEMPTY): that migration removes it when it ends.
func removeParent(root string) {
	os.Remove(filepath.Join(root, Parent))
}

// MoveAll moves every process of the group, in every hierarchy, to the
// cgroup at parent (a path below each hierarchy's root, "/" for the root
// itself), which must exist in each. Processes in child groups stay.
func (g *Group) MoveAll(parent string) error {
	if !filepath.IsAbs(parent) || strings.Contains(parent, "\x00") {
		return fmt.Errorf("cgroup parent %q: want an absolute path", parent)
	}
	var errs []error
	for i, dir := range g.Paths {
		to := filepath.Join(g.roots[i], filepath.Clean(parent))
		pids, err := readProcs(dir)
		if err != nil {
			errs = append(errs, fmt.Errorf("list cgroup %s: %w", dir, err))
			continue
		}
		for _, pid := range pids {
			err := os.WriteFile(filepath.Join(to, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
			if err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, fmt.Errorf("move %d to cgroup %s: %w", pid, to, err))
			}
		}
	}
	return errors.Join(errs...)
}

// CheckParent reports whether parent exists as a cgroup in every
// hierarchy Create uses.
func CheckParent(parent string) error {
	if !filepath.IsAbs(parent) {
		return fmt.Errorf("cgroup parent %q: want an absolute path", parent)
	}
	rs := roots(false)
	if len(rs) == 0 {
		return ErrNoHierarchy
	}
	for _, r := range rs {
		if _, err := os.Stat(filepath.Join(r, filepath.Clean(parent), "cgroup.procs")); err != nil {
			return fmt.Errorf("cgroup parent %s in %s: %w", parent, r, err)
		}
	}
	return nil
}

// removeTree removes a cgroup directory and its child cgroups. Cgroup
// directories hold only control files, which rmdir takes with them.
func removeTree(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if e.IsDir() {
			if err := removeTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	return rmdir(dir)
}

// rmdir removes an empty cgroup directory. A process that just left it
// (exited, or moved while exiting) can keep it populated for a moment:
// EBUSY is retried for up to two seconds.
func rmdir(dir string) error {
	for deadline := time.Now().Add(2 * time.Second); ; {
		err := os.Remove(dir)
		if err == nil || !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond) // the kernel gives no event to wait for here
	}
}

package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/phaul/phaul/core/linux"
)

// Limits caps the processes of a group.
type Limits struct {
	PidsMax   int64  // pids.max; 0: no cap
	MemoryMax uint64 // bytes (memory.max, v1 memory.limit_in_bytes); 0: no cap
}

// CreateLimited makes phaul/<name> where the pids and memory controllers
// are (their own v1 hierarchies, else cgroup v2, whose phaul/ directory
// gets them in its cgroup.subtree_control) and sets l there. A limit no
// hierarchy can carry is an error: a policy that asks for it must hold.
func CreateLimited(name string, l Limits) (*Group, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
		return nil, fmt.Errorf("cgroup %q: bad name", name)
	}
	g := &Group{Name: name}
	type setting struct{ controller, v1file, v2file, value string }
	var want []setting
	if l.PidsMax > 0 {
		v := strconv.FormatInt(l.PidsMax, 10)
		want = append(want, setting{"pids", "pids.max", "pids.max", v})
	}
	if l.MemoryMax > 0 {
		v := strconv.FormatUint(l.MemoryMax, 10)
		want = append(want, setting{"memory", "memory.limit_in_bytes", "memory.max", v})
	}
	for _, s := range want {
		dir, file, err := g.limitDir(s.controller)
		if err != nil {
			g.Remove()
			return nil, err
		}
		f := s.v1file
		if file {
			f = s.v2file
		}
		if err := os.WriteFile(filepath.Join(dir, f), []byte(s.value), 0); err != nil {
			g.Remove()
			return nil, fmt.Errorf("cgroup %s: set %s: %w", dir, f, err)
		}
	}
	return g, nil
}

// limitDir returns the group's directory for controller, creating it: in
// the controller's v1 hierarchy, else in cgroup v2 (v2 true).
func (g *Group) limitDir(controller string) (dir string, v2 bool, err error) {
	root, err := linux.ControllerV1Root(controller)
	if err != nil {
		if root, err = linux.Cgroup2Root(); err != nil {
			return "", false, fmt.Errorf("cgroup %s: no hierarchy has the %s controller", g.Name, controller)
		}
		v2 = true
	}
	if i := slices.Index(g.roots, root); i >= 0 {
		return g.Paths[i], v2, nil // one v2 group carries both
	}
	parent := filepath.Join(root, Parent)
	if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", false, fmt.Errorf("create cgroup %s: %w", parent, err)
	}
	if v2 {
		ctl := filepath.Join(parent, "cgroup.subtree_control")
		if err := os.WriteFile(ctl, []byte("+"+controller), 0); err != nil {
			removeParent(root)
			return "", false, fmt.Errorf("cgroup v2: enable %s for %s: %w", controller, parent, err)
		}
	}
	dir = filepath.Join(parent, g.Name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		removeParent(root)
		return "", false, fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	g.Paths = append(g.Paths, dir)
	g.roots = append(g.roots, root)
	return dir, v2, nil
}

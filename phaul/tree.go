package phaul

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/phaul/phaul/core/linux"
)

// The process tree being migrated, as /proc shows it.

// treePids returns root and its descendants (threads' children included).
func treePids(root int) ([]int, error) {
	pids := []int{root}
	for i := 0; i < len(pids); i++ {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pids[i]))
		if err != nil {
			if i == 0 {
				return nil, fmt.Errorf("tree of %d: %w", root, err)
			}
			continue // exited meanwhile
		}
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pids[i], t.Name()))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
		}
	}
	return pids, nil
}

// memoryless reports whether pid has no memory to move: gone, or a zombie
// (CRIU dumps a zombie as a pstree entry, without mappings or pages). Its
// memory is released before it turns zombie, so a tracker has nothing to
// arm, and nothing to inject through.
func memoryless(pid int) bool {
	st, err := linux.ReadProcessStat(pid)
	return err != nil || st.State == 'Z' || st.State == 'X'
}

// nsPid returns pid's number in its own (innermost) PID namespace: the id
// CRIU gives its pagemap.
func nsPid(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			return strconv.ParseUint(f[len(f)-1], 10, 64)
		}
	}
	return 0, fmt.Errorf("status of %d: no NSpid", pid)
}

// openTree opens pidfds for the processes of the tree rooted at root.
func openTree(root int) ([]*linux.Pidfd, error) {
	pids, err := treePids(root)
	if err != nil {
		return nil, fmt.Errorf("source tree: %w", err)
	}
	var pfds []*linux.Pidfd
	for _, pid := range pids {
		p, err := linux.PidfdOpen(pid)
		if err != nil {
			closeAll(pfds)
			return nil, fmt.Errorf("source tree: %w", err)
		}
		pfds = append(pfds, p)
	}
	return pfds, nil
}

func closeAll(pfds []*linux.Pidfd) {
	for _, p := range pfds {
		p.Close()
	}
}

// checkTarget refuses processes phaul must not move: none, pid 1, phaul
// itself or any of its ancestors (moving one would kill phaul mid-way).
func checkTarget(pid int) error {
	if pid == 1 {
		return fmt.Errorf("%w: pid 1 is the host's init", ErrBadTarget)
	}
	if alive, err := linux.ProcessExists(pid); err != nil || !alive {
		return fmt.Errorf("%w: pid %d does not exist", ErrBadTarget, pid)
	}
	for p := os.Getpid(); p > 1; {
		if p == pid {
			if p == os.Getpid() {
				return fmt.Errorf("%w: pid %d is phaul itself", ErrBadTarget, pid)
			}
			return fmt.Errorf("%w: pid %d is an ancestor of phaul", ErrBadTarget, pid)
		}
		st, err := linux.ReadProcessStat(p)
		if err != nil {
			break
		}
		p = st.PPID
	}
	return nil
}

// lazyBlocker returns why CRIU's lazy dump cannot take the tree rooted at
// root, or "" if it can. CRIU 4.2's lazy dump cannot splice the pages of a
// memfd mapped private ("Can't splice all pages to pipe"); its full dump
// can. The check runs just before the freeze, after the rounds.
func lazyBlocker(root int) string {
	pids, err := treePids(root)
	if err != nil {
		return ""
	}
	for _, pid := range pids {
		ms, err := linux.ReadMaps(pid)
		if err != nil {
			continue // exited, or a zombie: no mappings
		}
		for _, m := range ms {
			if m.Private() && strings.HasPrefix(m.Path, "/memfd:") {
				return fmt.Sprintf("process %d maps memfd %q private, which CRIU's lazy dump cannot splice", pid, m.Path)
			}
		}
	}
	return ""
}

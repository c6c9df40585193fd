package phaul

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
)

// strayCRIUs plans the CRIU processes that work in workDir (CRIU's cwd is
// its work dir: a migration's directory there, named by its id) whose
// migration has no journal entry: it is gone (a work dir cleaned by hand, a
// crash before the entry named them). One that holds no process (it
// traces none and has no children) is killed; one that does is listed and
// left: no entry says whether that tree may run.
func strayCRIUs(workDir string, ents []JournalEntry) []Leftover {
	known, ids := map[int]bool{}, map[string]bool{}
	for _, e := range ents {
		known[e.CRIU], ids[e.ID] = true, true
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var plan []Leftover
	for _, d := range procs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || known[pid] {
			continue
		}
		helper := isLazyHelper(pid)
		if !helper && !isCRIU(pid) {
			continue
		}
		cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
		if err != nil {
			continue
		}
		cwd = strings.TrimSuffix(cwd, " (deleted)")
		rel, ok := strings.CutPrefix(cwd, filepath.Clean(workDir)+"/")
		first := strings.Split(rel, "/")[0]
		if !ok || ids[first] || !migrationID.MatchString(first) {
			continue // not here, its migration's entry speaks for it, or no migration's directory
		}
		l := Leftover{Kind: "criu", What: fmt.Sprintf("criu pid %d in %s", pid, cwd),
			Why: "a CRIU working in this work dir that no journal entry names"}
		if helper {
			l.Kind, l.What = "lazy-pages", fmt.Sprintf("lazy-pages helper pid %d in %s", pid, cwd)
			l.Why = "a lazy-pages helper working in this work dir that no journal entry names"
		}
		if n := userfaultfds(pid); helper && n > 0 {
			l.Why += fmt.Sprintf("; it holds %d userfaultfds of a restored tree, whose missing pages would read as zeros without it: left", n)
		} else if held := heldProcesses(pid); len(held) > 0 {
			l.Why += fmt.Sprintf("; it holds processes %v, which no entry says may run or not: left", held)
		} else {
			st, err := linux.ReadProcessStat(pid)
			if err != nil {
				continue
			}
			l.Action = "kill it (it holds no process)"
			l.apply = func() error { return killExact(pid, st.StartTicks) }
		}
		plan = append(plan, l)
	}
	return plan
}

// isCRIU reports whether pid runs CRIU (its command line names criu and
// one of its commands as phaul runs them).
func isCRIU(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	named := slices.ContainsFunc(args, func(a string) bool { return filepath.Base(a) == "criu" })
	return named && slices.ContainsFunc(args, func(a string) bool { return a == "swrk" || a == "dump" || a == "restore" })
}

// isLazyHelper reports whether pid runs phaul's lazy-pages helper.
func isLazyHelper(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	return len(args) > 1 && filepath.Base(args[0]) == "phaul" && args[1] == "lazy-pages"
}

// userfaultfds counts pid's open userfaultfds.
func userfaultfds(pid int) int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && l == "anon_inode:[userfaultfd]" {
			n++
		}
	}
	return n
}

// heldProcesses lists the processes pid traces or is the parent of.
func heldProcesses(pid int) []int {
	var held []int
	procs, _ := os.ReadDir("/proc")
	for _, d := range procs {
		p, err := strconv.Atoi(d.Name())
		if err != nil || p == pid {
			continue
		}
		if t, err := linux.TracerPid(p); err == nil && t == pid {
			held = append(held, p)
			continue
		}
		if st, err := linux.ReadProcessStat(p); err == nil && st.PPID == pid {
			held = append(held, p)
		}
	}
	return held
}

// killExact kills pid by pidfd if it is still the process that started at
// start, and waits until it is gone.
func killExact(pid int, start uint64) error {
	p, err := linux.PidfdOpen(pid)
	if err != nil {
		return ignoreNotExist(err)
	}
	defer p.Close()
	if st, err := linux.ReadProcessStat(pid); err != nil || st.StartTicks != start {
		return nil // gone, or the pid names another process now
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	return waitUntil(10*time.Second, func() bool {
		st, err := linux.ReadProcessStat(pid)
		return err != nil || st.StartTicks != start || st.State == 'Z'
	}, "process %d still runs", pid)
}

// staleLimitsAge is how old an empty limits group must be before gc takes
// it for a finished tree's: CRIU joins a new one within a second.
var staleLimitsAge = time.Minute

// strayLimitGroups plans the policy's limits groups (phaul/<id>-limits)
// a committed tree left when it exited: empty, older than staleLimitsAge,
// with no journal entry. One that holds processes caps a running tree and
// is not listed.
func strayLimitGroups(ents []JournalEntry) []Leftover {
	ids := map[string]bool{}
	for _, e := range ents {
		ids[e.ID] = true
	}
	roots, err := linux.CgroupRoots()
	if err != nil {
		return nil
	}
	seen := map[string]bool{}
	var plan []Leftover
	for _, r := range roots {
		ds, err := os.ReadDir(filepath.Join(r, cgroup.Parent))
		if err != nil {
			continue
		}
		for _, d := range ds {
			id, ok := strings.CutSuffix(d.Name(), "-limits")
			if !ok || !d.IsDir() || ids[id] || seen[d.Name()] || !migrationIDRe.MatchString(id) {
				continue
			}
			seen[d.Name()] = true
			g, err := cgroup.Open(d.Name())
			if err != nil {
				continue
			}
			if procs, err := g.Procs(); err != nil || len(procs) > 0 || !olderThan(g.Paths[0], staleLimitsAge) {
				continue
			}
			plan = append(plan, Leftover{Migration: id, Kind: "cgroup", What: cgroup.Parent + "/" + d.Name(),
				Why: "the restore policy's limits group of a finished migration, empty: its tree exited", Action: "remove",
				apply: g.Remove})
		}
	}
	return plan
}

func olderThan(path string, age time.Duration) bool {
	fi, err := os.Stat(path)
	return err == nil && time.Since(fi.ModTime()) >= age
}

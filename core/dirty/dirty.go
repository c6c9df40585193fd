// Package dirty finds the pages a running process writes, so that
// pre-copy re-sends only those. A Tracker follows one process (one mm):
// Start arms it, each Collect returns the pages written since the previous
// Collect (the first: since Start) and re-arms, Stop undoes everything done
// to the process.
//
// Three kinds, best first:
//
//   - uffd-wp: userfaultfd with UFFD_FEATURE_WP_ASYNC write-protects the
//     process's private mappings; the kernel resolves write faults itself
//     and PAGEMAP_SCAN on /proc/PID/pagemap reads and re-arms the written
//     set in one call (Linux 6.7). The userfaultfd is made by the process
//     itself, through an injected system call, taken with pidfd_getfd and
//     closed in the process at once: phaul's copy is the only one.
//   - soft-dirty: clear_refs and bit 55 of pagemap (CONFIG_MEM_SOFT_DIRTY).
//   - hash: a 64-bit hash of every present page, compared each round; needs
//     nothing from the kernel but reads all memory every Collect.
//
// Collect reports whole ranges it cannot vouch for (a mapping that is new,
// moved, grown, or whose registration was lost) as written: over-reporting
// costs bandwidth, under-reporting would lose data.
package dirty

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

// Kinds of tracker.
const (
	KindAuto      = "auto"
	KindUffdWP    = "uffd-wp"
	KindSoftDirty = "soft-dirty"
	KindHash      = "hash"
)

// Kinds lists the trackers, best first.
var Kinds = []string{KindUffdWP, KindSoftDirty, KindHash}

const pageSize = 4096

// Range is the pages [Start, End), page aligned.
type Range struct{ Start, End uint64 }

// Pages returns the number of pages in r.
func (r Range) Pages() uint64 { return (r.End - r.Start) / pageSize }

// Tracker finds the pages one process writes.
type Tracker interface {
	// Kind names the tracker.
	Kind() string
	// Collect returns the pages written since the previous Collect (the
	// first: since Start), sorted and not overlapping, and re-arms.
	Collect() ([]Range, error)
	// Stop ends tracking and undoes what Start did to the process. It is
	// idempotent.
	Stop() error
}

// ContentTracker is a Tracker that finds written pages by their content.
// Its Collect compares each page with what it read then, and a sender reads
// a page again after Collect: a page that changed between the two reads and
// changed back before the next Collect would look unwritten while the
// destination holds the second read. Sent records what was sent instead.
type ContentTracker interface {
	Tracker
	// Sent records that data, whole pages from vaddr on, is what the
	// destination now holds of them.
	Sent(vaddr uint64, data []byte)
}

// ErrUnavailable is wrapped when a tracker cannot work here or for this
// process.
var ErrUnavailable = errors.New("dirty tracker unavailable")

// Available reports whether kind can work on this host (nil), and why not.
func Available(kind string) error {
	switch kind {
	case KindUffdWP:
		for _, probe := range []func() error{linux.HaveUffdWPAsync, linux.HavePagemapScan, linux.HavePidfdGetfd} {
			if err := probe(); err != nil {
				return fmt.Errorf("%w: %s: %w", ErrUnavailable, kind, err)
			}
		}
		return nil
	case KindSoftDirty:
		if err := linux.HaveSoftDirty(); err != nil {
			return fmt.Errorf("%w: %s: %w", ErrUnavailable, kind, err)
		}
		return nil
	case KindHash:
		return nil
	}
	return fmt.Errorf("tracker %q: want %s or auto", kind, strings.Join(Kinds, ", "))
}

// Start starts a tracker of kind for process pid; KindAuto picks the first
// kind available here and for that process.
func Start(kind string, pid int) (Tracker, error) {
	if kind == KindAuto || kind == "" {
		var errs []error
		for _, k := range Kinds {
			t, err := Start(k, pid)
			if err == nil {
				return t, nil
			}
			if !errors.Is(err, ErrUnavailable) {
				return nil, err
			}
			errs = append(errs, err)
		}
		return nil, errors.Join(errs...)
	}
	if err := Available(kind); err != nil {
		return nil, err
	}
	switch kind {
	case KindUffdWP:
		if err := seccompAllows(pid); err != nil {
			return nil, err
		}
		return startUffdWP(pid)
	case KindSoftDirty:
		return startSoftDirty(pid)
	case KindHash:
		return startHash(pid)
	}
	return nil, fmt.Errorf("tracker %q: want %s or auto", kind, strings.Join(Kinds, ", "))
}

// seccompAllows refuses a process under a seccomp filter: the filter may
// block userfaultfd(2), or kill the process for trying.
func seccompAllows(pid int) error {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return fmt.Errorf("status of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Seccomp:"); ok && strings.TrimSpace(v) != "0" {
			return fmt.Errorf("%w: %s: process %d runs under seccomp mode %s, which may block or punish userfaultfd",
				ErrUnavailable, KindUffdWP, pid, strings.TrimSpace(v))
		}
	}
	return nil
}

// entriesChunk pagemap entries are read at once.
const entriesChunk = 256

// walkEntries calls fn with the pagemap entries of every range of rs, in
// chunks of at most len(buf) pages read into buf.
func walkEntries(pm *linux.Pagemap, rs []Range, buf []linux.PagemapEntry, fn func(at uint64, ents []linux.PagemapEntry)) error {
	for _, r := range rs {
		for at := r.Start; at < r.End; at += uint64(len(buf)) * pageSize {
			n := min(len(buf), int((r.End-at)/pageSize))
			if err := pm.Entries(at, buf[:n]); err != nil {
				return err
			}
			fn(at, buf[:n])
		}
	}
	return nil
}

// addPage appends the page at addr to out, joined to the last range when
// it follows it.
func addPage(out []Range, addr uint64) []Range {
	if n := len(out); n > 0 && out[n-1].End == addr {
		out[n-1].End += pageSize
		return out
	}
	return append(out, Range{addr, addr + pageSize})
}

// covered reports whether r lies inside the union of the sorted ranges.
func covered(rs []Range, r Range) bool {
	i, _ := slices.BinarySearchFunc(rs, r.Start, func(x Range, a uint64) int {
		switch {
		case x.End <= a:
			return -1
		case x.Start > a:
			return 1
		}
		return 0
	})
	at := r.Start
	for ; i < len(rs) && at < r.End; i++ {
		if rs[i].Start > at {
			return false
		}
		at = max(at, rs[i].End)
	}
	return at >= r.End
}

// merge sorts rs and joins touching or overlapping ranges.
func merge(rs []Range) []Range {
	slices.SortFunc(rs, func(a, b Range) int {
		switch {
		case a.Start < b.Start:
			return -1
		case a.Start > b.Start:
			return 1
		}
		return 0
	})
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && r.Start <= out[n-1].End {
			out[n-1].End = max(out[n-1].End, r.End)
			continue
		}
		out = append(out, r)
	}
	return out
}

// Leftovers lists what uffd-wp tracking left in process pid: userfaultfd
// descriptors it holds, and mappings still registered for write-protection
// (smaps VmFlag "uw"). After Stop there are none; a tracker killed while
// tracking leaves the registration (see ../shared/uffd-wp-tracking.md).
func Leftovers(pid int) ([]string, error) {
	out, err := uffdDescriptors(pid)
	if err != nil {
		return nil, err
	}
	smaps, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, err
	}
	var mapping string
	for _, line := range strings.Split(string(smaps), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 0 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":"):
			mapping = f[0]
		case len(f) > 0 && f[0] == "VmFlags:" && slices.Contains(f[1:], "uw"):
			out = append(out, "mapping "+mapping+" registered for uffd-wp")
		}
	}
	return out, nil
}

// uffdDescriptors lists the userfaultfd descriptors process pid holds.
func uffdDescriptors(pid int) ([]string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, fd := range fds {
		if l, _ := os.Readlink(filepath.Join(dir, fd.Name())); strings.Contains(l, "userfaultfd") {
			out = append(out, "fd "+fd.Name()+" is a userfaultfd")
		}
	}
	return out, nil
}

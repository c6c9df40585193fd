package lazy

import (
	"slices"
	"time"
)

// Stats reports a daemon's progress. Page counts are of 4 KiB pages.
type Stats struct {
	// Tasks counts the userfaultfds served: the restored tasks and the
	// children they forked.
	Tasks int
	// LazyPages counts the lazy pages the images list for the restored
	// tasks (not for their children).
	LazyPages uint64
	// FaultPages counts pages copied because a thread faulted on them,
	// PushedPages those copied in the background; pages copied into a
	// forked child count again.
	FaultPages  uint64
	PushedPages uint64
	// ZeroPages counts faults outside the lazy ranges, answered with the
	// zero page.
	ZeroPages uint64
	// SkippedPages counts lazy pages never copied: the task dropped them
	// (madvise), unmapped or moved over them, they were present already,
	// no registered VMA held them, or the task exited.
	SkippedPages uint64
	// Faults counts faults on lazy pages; FaultP50, FaultP99 and FaultMax
	// are their latencies, from reading the fault to the copy that
	// resolved it.
	Faults                       uint64
	FaultP50, FaultP99, FaultMax time.Duration
	// FillTime runs from the restore's finish marker (or Detach, if
	// first) to the last page copied (0 before both).
	FillTime time.Duration
	// Done is set once every lazy page is in place and Serve returned nil.
	Done bool
}

// maxLatencySamples bounds the fault latencies kept for the percentiles
// (8 MiB); the maximum counts every fault.
const maxLatencySamples = 1 << 20

// stats is the daemon's running account, guarded by Daemon.mu.
type stats struct {
	s        Stats
	finishAt time.Time // the finish marker
	lastAt   time.Time // the last page copied
	lat      []time.Duration
}

func (st *stats) fault(d time.Duration) {
	st.s.Faults++
	st.s.FaultMax = max(st.s.FaultMax, d)
	if len(st.lat) < maxLatencySamples {
		st.lat = append(st.lat, d)
	}
}

func (st *stats) snapshot() Stats {
	s := st.s
	if n := len(st.lat); n > 0 {
		lat := slices.Clone(st.lat)
		slices.Sort(lat)
		s.FaultP50 = lat[(n-1)/2]
		s.FaultP99 = lat[(n-1)*99/100]
	}
	if !st.finishAt.IsZero() && st.lastAt.After(st.finishAt) {
		s.FillTime = st.lastAt.Sub(st.finishAt)
	}
	return s
}

// Stats returns the daemon's counters so far; safe to call while Serve
// runs.
func (d *Daemon) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st.snapshot()
}

// account runs f on the running stats under d.mu.
func (d *Daemon) account(f func(*stats)) {
	d.mu.Lock()
	f(&d.st)
	d.mu.Unlock()
}

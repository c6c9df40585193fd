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
	// With a Source that says which pages are remote (Remoter), the
	// same split: faults served locally and those fetched from afar.
	LocalFaults, RemoteFaults                      uint64
	LocalFaultP50, LocalFaultP99, LocalFaultMax    time.Duration
	RemoteFaultP50, RemoteFaultP99, RemoteFaultMax time.Duration
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
	// by origin: [0] local, [1] remote (a Remoter Source only)
	originLat [2][]time.Duration
	originMax [2]time.Duration
	originN   [2]uint64
}

// fault records a fault's latency; origin is 0 (local), 1 (remote) or -1
// (the Source does not say).
func (st *stats) fault(d time.Duration, origin int) {
	st.s.Faults++
	st.s.FaultMax = max(st.s.FaultMax, d)
	if len(st.lat) < maxLatencySamples {
		st.lat = append(st.lat, d)
	}
	if origin >= 0 {
		st.originN[origin]++
		st.originMax[origin] = max(st.originMax[origin], d)
		if len(st.originLat[origin]) < maxLatencySamples {
			st.originLat[origin] = append(st.originLat[origin], d)
		}
	}
}

// percentiles returns the p50 and p99 of lat.
func percentiles(lat []time.Duration) (p50, p99 time.Duration) {
	n := len(lat)
	if n == 0 {
		return 0, 0
	}
	lat = slices.Clone(lat)
	slices.Sort(lat)
	return lat[(n-1)/2], lat[(n-1)*99/100]
}

func (st *stats) snapshot() Stats {
	s := st.s
	s.FaultP50, s.FaultP99 = percentiles(st.lat)
	s.LocalFaultP50, s.LocalFaultP99 = percentiles(st.originLat[0])
	s.RemoteFaultP50, s.RemoteFaultP99 = percentiles(st.originLat[1])
	s.LocalFaultMax, s.RemoteFaultMax = st.originMax[0], st.originMax[1]
	s.LocalFaults, s.RemoteFaults = st.originN[0], st.originN[1]
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

package phaul

import (
	"context"
	"fmt"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/pageserver"
)

// Pre-copy moves the tree's memory while it runs. Round 1 arms a dirty
// tracker on every process of the tree and sends all its memory; each
// later round first collects what was written since (which re-arms), then
// reads that with process_vm_readv and sends it. When what is left would
// cross within the downtime target, the tree is frozen by CRIU's dump: the
// first pagemap CRIU opens on the page server proves every task is frozen,
// and there the last dirty pages are read and sent, after a final-set
// frame. CRIU's own pages then pass a filter that sends only what the
// destination lacks and names the rest with keep frames, so that the
// destination's images hold exactly the pages of the frozen tree.

// precopyProc is one process of the tree being tracked.
type precopyProc struct {
	pid     int
	key     pagestore.Key // CRIU's pagemap of it: its pid in the tree's namespace
	tr      dirty.Tracker
	pm      *linux.Pagemap
	pending []dirty.Range // collected, not sent yet
}

// precopy is the source side of pre-copy over one forward session.
type precopy struct {
	s     *source
	fw    *pageserver.Forwarder
	root  int
	procs map[int]*precopyProc
	sent  map[pagestore.Key]pageSet // every page sent, by pagemap
	// markers: pages holding only the uffd-wp tracker's marker at the
	// freeze (findMarkers); the final pass drops them.
	markers map[pagestore.Key]pageSet
	ents    []linux.PagemapEntry
	buf     []byte
	// The round in progress: its counters, what it set out to send, the
	// downtime expected before it.
	roundPages, roundBytes uint64
	round                  int
	remaining              uint64
	expected               time.Duration
	lastProgress           time.Time
	zeroPFN                uint64 // the shared zero page's frame; 0: unknown
	// Auto-converge: the throttle (nil until the first step), rounds in
	// a row that dirtied more than half of what they sent, and the CPU
	// the tree used before any throttle (cores), with where it was read.
	throttle  *cgroup.Throttle
	tooFast   int
	cores     float64
	cpuAt     time.Time
	cpuBefore time.Duration
	treeBytes uint64             // what round 1 found to send: the tree's memory
	released  chan time.Duration // releaseTracking's result; nil if none runs
	// Across calls of rounds: the predicted floor, the last round's
	// bandwidth (bytes per second), when the last collect ran.
	floorD      time.Duration
	bandwidth   float64
	lastCollect time.Time
	// destLazy: the destination restores lazily (its populate probe
	// says so): no prefault helps it.
	destLazy bool
	// Post-copy: the final set sends what the destination lacks as lazy
	// entries, recorded in remote, instead of their data.
	postcopy bool
	remote   *remoteSet
	// frozenPids maps the frozen tree's pids in its namespace to host
	// pids, for pagemaps of processes no tracker follows (hostPid).
	frozenPids map[uint64]int
}

// progress reports the round in progress, at most every 100 ms.
func (p *precopy) progress() {
	if p.s.cfg.Progress == nil || time.Since(p.lastProgress) < 100*time.Millisecond {
		return
	}
	p.lastProgress = time.Now()
	p.s.cfg.Progress(Event{Phase: PhaseRounds, Bytes: p.roundBytes, Elapsed: time.Since(p.s.stats.start),
		Round: p.round, Remaining: p.remaining - min(p.remaining, p.roundBytes), ExpectedDowntime: p.expected})
}

func newPrecopy(s *source, fw *pageserver.Forwarder, root int) *precopy {
	zero, err := linux.ZeroPagePFN()
	if err != nil {
		s.log.Debug("zero page frame unknown: zero-page pages are sent and dropped later", "err", err)
	}
	return &precopy{s: s, fw: fw, root: root, procs: make(map[int]*precopyProc), zeroPFN: zero,
		sent: make(map[pagestore.Key]pageSet),
		ents: make([]linux.PagemapEntry, readChunk), buf: make([]byte, readChunk*pagestore.PageSize)}
}

// readChunk pages are looked up and read at once (1 MiB).
const readChunk = 256

// pageSet is a set of page addresses.
type pageSet map[uint64]uint64 // page number / 64 -> bits

func (s pageSet) add(vaddr, n uint64) {
	for pn := vaddr / pagestore.PageSize; n > 0; pn, n = pn+1, n-1 {
		s[pn>>6] |= 1 << (pn & 63)
	}
}

func (s pageSet) has(vaddr uint64) bool {
	pn := vaddr / pagestore.PageSize
	return s[pn>>6]&(1<<(pn&63)) != 0
}

// refresh starts tracking processes new to the tree (whole: their memory
// is sent in full by the next send) and forgets those that are gone.
func (p *precopy) refresh() error {
	pids, err := treePids(p.root)
	if err != nil {
		return err
	}
	alive := make(map[int]bool, len(pids))
	for _, pid := range pids {
		if memoryless(pid) {
			continue
		}
		alive[pid] = true
		if p.procs[pid] != nil {
			continue
		}
		vpid, err := nsPid(pid)
		if err != nil {
			continue // exited meanwhile
		}
		tr, err := dirty.Start(p.s.cfg.Tracker, pid)
		if err != nil {
			return fmt.Errorf("track %d: %w", pid, err)
		}
		pm, err := linux.OpenPagemap(pid)
		if err != nil {
			tr.Stop()
			return fmt.Errorf("track %d: %w", pid, err)
		}
		// Tracking is armed before anything is read: a write after the
		// read below is caught by the next collect.
		all, err := dirty.Mappings(pid)
		if err != nil {
			tr.Stop()
			pm.Close()
			return fmt.Errorf("track %d: %w", pid, err)
		}
		pr := &precopyProc{pid: pid, key: pagestore.Key{Kind: pagestore.KindTask, ID: vpid}, tr: tr, pm: pm, pending: all}
		if _, err := p.fw.Open(pr.key); err != nil {
			p.stopProc(pr)
			return err
		}
		p.procs[pid] = pr
		p.s.log.Debug("tracking", "pid", pid, "vpid", vpid, "tracker", tr.Kind())
	}
	for pid, pr := range p.procs {
		if !alive[pid] {
			p.stopProc(pr)
			delete(p.procs, pid)
		}
	}
	return nil
}

func (p *precopy) stopProc(pr *precopyProc) {
	p.release(pr)
	pr.pm.Close()
}

// release ends pr's dirty tracking (its tracker's undo: for uffd-wp,
// closing phaul's userfaultfd unprotects the whole mm).
func (p *precopy) release(pr *precopyProc) {
	if pr.tr == nil {
		return
	}
	if err := pr.tr.Stop(); err != nil {
		p.s.log.Warn("stop tracker", "pid", pr.pid, "err", err)
	}
	pr.tr = nil
}

// releaseTracking ends every tracker once the last collect and the last
// read of the frozen tree are done, inside the freeze, in the background:
// the destination restores meanwhile (at 1 GiB closing the userfaultfd
// takes about 30 ms, holding the tree's mm lock). waitRelease collects it
// and records what it cost.
func (p *precopy) releaseTracking() {
	var trs []dirty.Tracker
	for _, pr := range p.procs {
		if pr.tr != nil {
			trs = append(trs, pr.tr)
			pr.tr = nil
		}
	}
	done := make(chan time.Duration, 1)
	p.released = done
	go func() { // owned by p: waitRelease collects it
		t0 := time.Now()
		for _, tr := range trs {
			if err := tr.Stop(); err != nil {
				p.s.log.Warn("stop tracker", "err", err)
			}
		}
		done <- time.Since(t0)
	}()
}

// waitRelease waits for releaseTracking's work, if any, and records its
// cost in the stats.
func (p *precopy) waitRelease() {
	if p.released == nil {
		return
	}
	p.s.stats.TrackerReleaseMS = ms(<-p.released)
	p.released = nil
}

// stop ends every tracker: after the migration, whatever its outcome (a
// resumed source runs untracked again).
func (p *precopy) stop() {
	p.waitRelease()
	if err := p.releaseThrottle(); err != nil {
		p.s.log.Error("auto-converge: release the throttle", "err", err)
	}
	for pid, pr := range p.procs {
		p.stopProc(pr)
		delete(p.procs, pid)
	}
}

// collect adds what each tracker collected to its pending ranges.
func (p *precopy) collect() error {
	for pid, pr := range p.procs {
		if pr.tr == nil {
			continue // released
		}
		rs, err := pr.tr.Collect()
		if err != nil {
			if memoryless(pid) {
				continue // exited: refresh drops it
			}
			return fmt.Errorf("collect %d: %w", pid, err)
		}
		pr.pending = append(pr.pending, rs...)
	}
	return nil
}

// pendingBytes returns the bytes of every process's pending ranges.
func (p *precopy) pendingBytes() uint64 {
	var total uint64
	for _, pr := range p.procs {
		for _, r := range pr.pending {
			total += r.End - r.Start
		}
	}
	return total
}

// sendPending reads every process's pending ranges and sends them.
func (p *precopy) sendPending(ctx context.Context) error {
	for _, pr := range p.procs {
		for _, r := range pr.pending {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := p.sendRange(pr, r); err != nil {
				return err
			}
		}
		pr.pending = pr.pending[:0]
	}
	return nil
}

// sendRange reads the pages of r that CRIU would dump (present or swapped,
// not file-backed page cache) and sends them.
func (p *precopy) sendRange(pr *precopyProc, r dirty.Range) error {
	for at := r.Start; at < r.End; {
		n := min(uint64(readChunk), (r.End-at)/pagestore.PageSize)
		ents := p.ents[:n]
		if err := pr.pm.Entries(at, ents); err != nil {
			return nil // unmapped meanwhile; CRIU will not dump it either
		}
		for i := uint64(0); i < n; {
			if ents[i].UffdWPMarker() {
				// No data: read, not sent, so that the page maps
				// what a read maps (the zero page, the file's page) and
				// no marker is left for CRIU's dump to take for a
				// swapped page (phaul/markers.go).
				j := i + 1
				for j < n && ents[j].UffdWPMarker() {
					j++
				}
				linux.ReadProcessMemory(pr.pid, at+i*pagestore.PageSize, p.buf[:(j-i)*pagestore.PageSize])
				i = j
				continue
			}
			if !p.wanted(ents[i]) {
				i++
				continue
			}
			j := i + 1
			for j < n && p.wanted(ents[j]) {
				j++
			}
			vaddr := at + i*pagestore.PageSize
			buf := p.buf[:(j-i)*pagestore.PageSize]
			got, err := linux.ReadProcessMemory(pr.pid, vaddr, buf)
			if err != nil {
				got = 0 // unmapped meanwhile
			}
			if pages := uint64(got) / pagestore.PageSize; pages > 0 {
				if err := p.fw.Add(pr.key, vaddr, pages, pagestore.FlagPresent, buf[:pages*pagestore.PageSize]); err != nil {
					return err
				}
				p.sentSet(pr.key).add(vaddr, pages)
				if ct, ok := pr.tr.(dirty.ContentTracker); ok {
					ct.Sent(vaddr, buf[:pages*pagestore.PageSize])
				}
				p.roundPages += pages
				p.roundBytes += pages * pagestore.PageSize
				p.progress()
			}
			i = j
		}
		at += n * pagestore.PageSize
	}
	return nil
}

// wanted: a page CRIU dumps (dirty.Dumpable).
func (p *precopy) wanted(e linux.PagemapEntry) bool { return dirty.Dumpable(e, p.zeroPFN) }

func (p *precopy) sentSet(k pagestore.Key) pageSet {
	s := p.sent[k]
	if s == nil {
		s = make(pageSet)
		p.sent[k] = s
	}
	return s
}

// pids lists the tracked processes.
func (p *precopy) pids() []int {
	pids := make([]int, 0, len(p.procs))
	if p.procs[p.root] != nil {
		pids = append(pids, p.root)
	}
	for pid := range p.procs {
		if pid != p.root {
			pids = append(pids, pid)
		}
	}
	return pids
}

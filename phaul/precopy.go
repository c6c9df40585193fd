package phaul

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/lazy"
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

// rounds runs pre-copy until what is left fits the downtime target or it
// stops converging, and returns why it stopped. What the last collect
// found stays pending for the final phase.
func (p *precopy) rounds(ctx context.Context) (string, error) {
	cfg := p.s.cfg
	var (
		best   = ^uint64(0)
		last   = ^uint64(0) // the dirty set of the round before
		noGain int
	)
	for round := p.round + 1; ; round++ {
		t0 := time.Now()
		if err := p.refresh(); err != nil {
			return "", err
		}
		var dirtyRate float64 // bytes per second since the last collect
		if round > 1 {
			if err := p.collect(); err != nil {
				return "", err
			}
			if round == faultDropCollect() {
				p.s.log.Warn("fault injection: dropping what this round collected", "round", round)
				for _, pr := range p.procs {
					pr.pending = nil
				}
			}
		}
		dirtyBytes := p.pendingBytes()
		if round > 1 {
			dirtyRate = float64(dirtyBytes) / max(time.Since(p.lastCollect).Seconds(), 1e-3)
		}
		p.lastCollect = time.Now()
		if round == 1 {
			var err error
			if p.floorD, err = p.floor(ctx, dirtyBytes); err != nil {
				return "", err
			}
		}
		floor := p.floorD
		if round > 1 {
			// Expected downtime if frozen now: the floor plus the dirty
			// set at the last round's bandwidth.
			expected := floor + time.Duration(float64(dirtyBytes)/max(p.bandwidth, 1)*float64(time.Second))
			reason := ""
			switch {
			case expected <= cfg.DowntimeTarget:
				reason = fmt.Sprintf("expected downtime %v fits the target %v", expected.Round(time.Millisecond), cfg.DowntimeTarget)
			case cfg.Mode == ModeHybrid && round > cfg.HybridRounds:
				reason = fmt.Sprintf("hybrid: %d rounds done; %d KiB left for post-copy", cfg.HybridRounds, dirtyBytes>>10)
			case cfg.Mode == ModeHybrid && dirtyBytes >= last:
				reason = fmt.Sprintf("hybrid: the dirty set stopped shrinking (%d KiB after %d KiB); the rest moves after the resume", dirtyBytes>>10, last>>10)
			case round > cfg.MaxRounds:
				reason = fmt.Sprintf("max rounds (%d) reached; expected downtime %v", cfg.MaxRounds, expected.Round(time.Millisecond))
			case floor > cfg.DowntimeTarget && dirtyBytes >= last:
				reason = fmt.Sprintf("the floor %v alone exceeds the target %v and the dirty set stopped shrinking (%d KiB); expected downtime %v",
					floor.Round(time.Millisecond), cfg.DowntimeTarget, dirtyBytes>>10, expected.Round(time.Millisecond))
			}
			if dirtyBytes < best {
				best, noGain = dirtyBytes, 0
			} else if noGain++; noGain >= 3 && reason == "" {
				reason = fmt.Sprintf("no gain in 3 rounds (dirty set %d KiB); expected downtime %v", dirtyBytes>>10, expected.Round(time.Millisecond))
			}
			p.s.log.Info("pre-copy", "round", round, "dirty_kib", dirtyBytes>>10, "dirty_rate_mbps", dirtyRate/1e6,
				"expected_downtime", expected.Round(time.Millisecond))
			p.expected = expected
			if reason != "" {
				if pct := p.throttlePct(); pct > 0 {
					reason += fmt.Sprintf("; auto-converge throttled the tree by %d%%", pct)
				}
				return reason, nil
			}
		}
		last = dirtyBytes
		if cfg.AutoConverge {
			if err := p.autoConverge(round, dirtyRate, p.bandwidth); err != nil {
				return "", err
			}
		}
		p.roundPages, p.roundBytes = 0, 0
		p.round, p.remaining = round, dirtyBytes
		wire0 := p.fw.Stats().WireBytes
		if err := p.sendPending(ctx); err != nil {
			return "", err
		}
		d := time.Since(t0)
		p.bandwidth = float64(p.roundBytes) / max(d.Seconds(), 1e-3)
		if err := p.s.keepalive(ctx); err != nil {
			return "", err
		}
		p.s.stats.Rounds = append(p.s.stats.Rounds, Round{Round: round, Kind: "precopy",
			DirtyPages: dirtyBytes / pagestore.PageSize, PagesSent: p.roundPages,
			BytesWire: p.fw.Stats().WireBytes - wire0, DurationMS: ms(d),
			BandwidthMBps: p.bandwidth / 1e6, DirtyRateMBps: dirtyRate / 1e6, ThrottlePct: p.throttlePct()})
	}
}

func (p *precopy) throttlePct() int {
	if p.throttle == nil {
		return 0
	}
	return p.throttle.Percent()
}

// autoConverge runs before each round's send, as QEMU's does after each
// pass: a round that found more dirtied than half of what the round before
// sent counts as too fast, and two in a row raise the throttle, 20% of the
// tree's unthrottled CPU first, then 10% more, up to 99%.
func (p *precopy) autoConverge(round int, dirtyRate, bandwidth float64) error {
	pids := p.pids()
	if p.throttle == nil {
		// The tree's CPU use so far, unthrottled.
		now, cpu := time.Now(), cgroup.TreeCPU(pids)
		if !p.cpuAt.IsZero() {
			p.cores = max(float64(cpu-p.cpuBefore)/float64(now.Sub(p.cpuAt)), 0.01)
		}
		p.cpuAt, p.cpuBefore = now, cpu
	}
	if round < 2 {
		return nil
	}
	if dirtyRate <= bandwidth/2 {
		p.tooFast = 0
		return nil
	}
	if p.tooFast++; p.tooFast < 2 {
		return nil
	}
	p.tooFast = 0
	pct := 20
	if p.throttle != nil {
		pct = min(p.throttle.Percent()+10, 99)
		if pct == p.throttle.Percent() {
			return nil
		}
	} else {
		t, err := cgroup.NewThrottle(p.s.stats.MigrationID+"-throttle", pids)
		if err != nil {
			return fmt.Errorf("auto-converge: %w", err)
		}
		// Recorded before the tree moves: a phaul killed meanwhile
		// leaves it throttled, and gc moves it back.
		err = p.s.j.record(func(e *JournalEntry) {
			e.Cgroups = append(e.Cgroups, "cpu:"+t.Group())
			e.ThrottleBack = t.Origin()
		})
		if err != nil {
			return fmt.Errorf("auto-converge: %w", err)
		}
		p.throttle = t
	}
	if err := p.throttle.Set(pids, pct, p.cores); err != nil {
		return fmt.Errorf("auto-converge: %w", err)
	}
	p.s.stats.AutoConvergePct = pct
	p.s.log.Info("auto-converge: throttling the tree", "percent", pct, "cores_unthrottled", p.cores,
		"dirty_rate_mbps", dirtyRate/1e6, "bandwidth_mbps", bandwidth/1e6)
	return nil
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

// releaseThrottle gives the tree its CPU and cgroups back: before the
// freeze, so that CRIU dumps the tree in the cgroups it came from, and
// whatever the outcome. A no-op without a throttle.
func (p *precopy) releaseThrottle() error {
	if p.throttle == nil {
		return nil
	}
	if err := p.throttle.Release(); err != nil {
		return err
	}
	p.throttle = nil
	p.s.log.Info("auto-converge: throttle released, the tree is back in its cpu cgroups")
	return nil
}

// prefault has the destination fill and hold as much memory as the tree
// holds, freed just before the freeze so that the restore reuses memory
// instead of touching it first. The tree runs on meanwhile: rounds follow.
func (p *precopy) prefault(ctx context.Context) error {
	t0 := time.Now()
	if err := p.s.prefault(ctx, p.treeBytes); err != nil {
		return fmt.Errorf("prefault: %w", err)
	}
	p.s.stats.PrefaultMS = ms(time.Since(t0))
	p.s.log.Info("destination prefaulted the tree's memory", "mib", p.treeBytes>>20, "dur", time.Since(t0))
	return nil
}

// floor predicts the downtime no pre-copy round can shorten: the fixed
// part of CRIU's dump and restore (--downtime-floor) plus filling the
// tree's memory on the destination, at the cost per MiB it measures now.
// It says so when that alone exceeds the target.
func (p *precopy) floor(ctx context.Context, treeBytes uint64) (time.Duration, error) {
	cfg := p.s.cfg
	perMiB, err := p.s.probePopulate(ctx)
	if err != nil {
		return 0, fmt.Errorf("populate probe: %w", err)
	}
	p.treeBytes = treeBytes
	p.destLazy = perMiB <= 1 // a lazy restore writes no memory in the freeze
	floor := cfg.DowntimeFloor + time.Duration(float64(perMiB)*float64(treeBytes)/(1<<20))
	p.s.stats.FloorMS = ms(floor)
	p.s.stats.PopulateMSPerGiB = ms(perMiB * 1024)
	p.s.log.Info("downtime floor", "floor", floor.Round(time.Millisecond), "fixed", cfg.DowntimeFloor,
		"tree_mib", treeBytes>>20, "populate_per_mib", perMiB)
	if floor > cfg.DowntimeTarget {
		p.s.log.Warn("the downtime floor alone exceeds the target: freezing once the dirty set stops shrinking",
			"floor", floor.Round(time.Millisecond), "target", cfg.DowntimeTarget)
	}
	return floor, nil
}

// finalFilter is the Store of the page server CRIU's final dump writes
// into. Its first Open (every task is frozen by then) sends the last dirty
// pages; then pages the destination has already are kept, not sent.
type finalFilter struct {
	p       *precopy
	ctx     context.Context
	started bool
	err     error
}

func (f *finalFilter) Open(k pagestore.Key) (bool, error) {
	if !f.started {
		f.started = true
		f.err = f.p.final(f.ctx)
	}
	if f.err != nil {
		// Failing the OPEN fails CRIU's dump: the tree resumes.
		return false, f.err
	}
	return f.p.fw.Open(k)
}

// final runs with the tree frozen: a final-set frame, then what was
// written since the last round.
func (p *precopy) final(ctx context.Context) error {
	t0 := time.Now()
	if err := p.fw.BeginFinal(); err != nil {
		return err
	}
	if err := p.collect(); err != nil {
		return err
	}
	// Before the last reads: they map pages where markers are, but a lazy
	// dump has already listed the markers' pages.
	p.findMarkers()
	p.roundPages, p.roundBytes = 0, 0
	wire0 := p.fw.Stats().WireBytes
	if p.postcopy {
		// Fetched from the held tree after the resume.
		p.dropDirty()
	} else if err := p.sendPending(ctx); err != nil {
		return err
	}
	p.s.stats.Rounds = append(p.s.stats.Rounds, Round{Round: len(p.s.stats.Rounds) + 1, Kind: "frozen",
		DirtyPages: p.roundPages, PagesSent: p.roundPages, BytesWire: p.fw.Stats().WireBytes - wire0,
		DurationMS: ms(time.Since(t0))})
	p.s.log.Info("pre-copy final dirty set sent", "pages", p.roundPages, "dur", time.Since(t0))
	if p.s.cfg.FinalDump != FinalDumpLazy {
		// Nothing is written until the tree is gone or resumes
		// untracked; CRIU dumps the pages meanwhile.
		p.releaseTracking()
	}
	return nil
}

func (f *finalFilter) Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	if f.err != nil {
		return f.err
	}
	if flags&pagestore.FlagPresent == 0 || len(data) == 0 || (f.p.sent[k] == nil && f.p.markers[k] == nil) {
		return f.p.fw.Add(k, vaddr, nrPages, flags, data)
	}
	for i := uint64(0); i < nrPages; {
		st := f.p.state(k, vaddr+i*pagestore.PageSize)
		j := i + 1
		for j < nrPages && f.p.state(k, vaddr+j*pagestore.PageSize) == st {
			j++
		}
		var err error
		switch st {
		case pageMarker: // no data on the source: drop
		case pageKept:
			err = f.p.fw.Keep(k, vaddr+i*pagestore.PageSize, j-i)
		default:
			err = f.p.fw.Add(k, vaddr+i*pagestore.PageSize, j-i, flags, data[i*pagestore.PageSize:j*pagestore.PageSize])
		}
		if err != nil {
			return err
		}
		i = j
	}
	return nil
}

func (f *finalFilter) Read(k pagestore.Key, vaddr uint64, buf []byte) error {
	return f.p.fw.Read(k, vaddr, buf)
}

func (f *finalFilter) Commit() error {
	if f.err != nil {
		return f.err
	}
	if !f.started {
		return errors.New("pre-copy: CRIU's dump opened no pagemap")
	}
	return f.p.fw.Commit()
}

// finalLazy runs in the post-dump notification of a lazy dump, with the
// tree frozen and held by CRIU: it sends the last dirty set, then turns the
// pagemaps CRIU wrote locally into the final set (pages already sent are
// kept; the rest come from the held tree, or from the local pages images
// for the few CRIU copied), removes those images (the destination writes
// its own from the store) and ends the forward session, which the
// destination commits.
func (p *precopy) finalLazy(ctx context.Context, imagesDir string) error {
	if err := p.final(ctx); err != nil {
		return err
	}
	t0 := time.Now()
	ents, err := os.ReadDir(imagesDir)
	if err != nil {
		return err
	}
	var kept, added uint64
	if p.postcopy {
		p.remote = newRemoteSet()
	}
	for _, e := range ents {
		k, ok := pagestore.ParsePagemapName(e.Name())
		if !ok {
			continue
		}
		if err := p.finalPagemap(ctx, imagesDir, e.Name(), k, &kept, &added); err != nil {
			return fmt.Errorf("final set from %s: %w", e.Name(), err)
		}
	}
	if p.remote != nil {
		p.s.log.Info("post-copy: pages left at the source", "pages", p.remote.pages, "tasks", len(p.remote.tasks))
	}
	// The local page images must not travel: the destination's store
	// writes the complete set.
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "pagemap-") || strings.HasPrefix(e.Name(), "pages-") {
			if err := os.Remove(filepath.Join(imagesDir, e.Name())); err != nil {
				return err
			}
		}
	}
	p.s.log.Info("final set from the lazy dump", "kept_pages", kept, "added_pages", added, "dur", time.Since(t0))
	// Every read of the held tree is done: the release (which holds its
	// mm's lock) runs while the destination restores. Nothing is written
	// until the tree is gone or resumes untracked.
	p.releaseTracking()
	return p.fw.Commit()
}

// finalPagemap sends one local pagemap as final-set frames.
func (p *precopy) finalPagemap(ctx context.Context, dir, name string, k pagestore.Key, kept, added *uint64) error {
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	pm, err := pagestore.ReadPagemap(f)
	f.Close()
	if err != nil {
		return err
	}
	var pages *os.File
	if pm.PresentPages() > 0 {
		if pages, err = os.Open(filepath.Join(dir, pagestore.PagesName(pm.PagesID))); err != nil {
			return err
		}
		defer pages.Close()
	}
	if _, err := p.fw.Open(k); err != nil {
		return err
	}
	pid := -1 // the process holding the lazy pages, looked up once
	// Post-copy sends the command line's and environment's pages as data:
	// other processes read them (ps), and such a read of a missing page
	// does not wait for the daemon (lazy.EagerRanges).
	var eager [][2]uint64
	if p.postcopy && k.Kind == pagestore.KindTask {
		if eager, err = lazy.EagerRanges(dir, k.ID); err != nil {
			return err
		}
	}
	isEager := func(va uint64) bool {
		for _, r := range eager {
			if va >= r[0] && va < r[1] {
				return true
			}
		}
		return false
	}
	var off int64 // in the pages image
	for _, e := range pm.Entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		present := e.Flags&pagestore.FlagPresent != 0
		for i := uint64(0); i < e.NrPages; {
			vaddr := e.Vaddr + i*pagestore.PageSize
			st, eg := p.state(k, vaddr), isEager(vaddr)
			j := i + 1
			for j < e.NrPages && j-i < readChunk && p.state(k, e.Vaddr+j*pagestore.PageSize) == st &&
				isEager(e.Vaddr+j*pagestore.PageSize) == eg {
				j++
			}
			n := j - i
			buf := p.buf[:n*pagestore.PageSize]
			switch {
			case st == pageMarker:
				// No data on the source: not dumped untracked either.
			case st == pageKept:
				if err := p.fw.Keep(k, vaddr, n); err != nil {
					return err
				}
				*kept += n
			case present:
				if _, err := pages.ReadAt(buf, off+int64(i*pagestore.PageSize)); err != nil {
					return fmt.Errorf("%s: %w", pagestore.PagesName(pm.PagesID), err)
				}
				if err := p.fw.Add(k, vaddr, n, pagestore.FlagPresent, buf); err != nil {
					return err
				}
				*added += n
			default:
				// Lazy: the content is in the held tree.
				if pid < 0 {
					if pid, err = p.hostPid(k); err != nil {
						return err
					}
				}
				if p.postcopy && !eg {
					// Fetched from there after the resume.
					if err := p.fw.Add(k, vaddr, n, pagestore.FlagLazy, nil); err != nil {
						return err
					}
					p.remote.add(k.ID, pid, vaddr, n)
					break
				}
				got, err := linux.ReadProcessMemory(pid, vaddr, buf)
				if err != nil || got != len(buf) {
					return fmt.Errorf("read %d pages at %#x of %d: %d bytes, %v", n, vaddr, pid, got, err)
				}
				if err := p.fw.Add(k, vaddr, n, pagestore.FlagPresent, buf); err != nil {
					return err
				}
				*added += n
			}
			i = j
		}
		if present {
			off += int64(e.NrPages * pagestore.PageSize)
		}
	}
	return nil
}

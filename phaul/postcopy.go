package phaul

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
	"github.com/phaul/phaul/pageserver"
)

// Post-copy on the source. The final set (precopy.finalLazy) sends the
// pages the destination lacks not as data but as lazy entries, recorded
// here as the remote set; the frozen tree stays held by CRIU's lazy dump
// after COMMIT, and the fetch streams serve the destination's requests
// from it (process_vm_readv) until the destination says it has every page.
// Only then does phaul end CRIU's session, which kills the tree.

// remoteSet is what the final set left at the source: by image id, the
// host pid holding the pages and its ranges.
type remoteSet struct {
	mu    sync.Mutex // add runs before serving starts; read after
	tasks map[uint64]*remoteTask
	pages uint64
}

type remoteTask struct {
	pid   int
	spans []span // sorted, disjoint, adjacent ones merged
}

// span is [start, end) in bytes.
type span struct{ start, end uint64 }

// appendSpan adds [start, end), which lies after every span of spans,
// merging it with the last one if they touch.
func appendSpan(spans []span, start, end uint64) []span {
	if k := len(spans); k > 0 && spans[k-1].end == start {
		spans[k-1].end = end
		return spans
	}
	return append(spans, span{start, end})
}

// runAt returns how many of the want bytes at vaddr lie all inside or all
// outside spans, and which.
func runAt(spans []span, vaddr, want uint64) (uint64, bool) {
	i := sort.Search(len(spans), func(i int) bool { return spans[i].end > vaddr })
	switch {
	case i == len(spans):
		return want, false
	case spans[i].start <= vaddr:
		return min(want, spans[i].end-vaddr), true
	default:
		return min(want, spans[i].start-vaddr), false
	}
}

func newRemoteSet() *remoteSet { return &remoteSet{tasks: make(map[uint64]*remoteTask)} }

// add records n pages of image id at vaddr, read from pid. Ranges of one
// id come in address order (a pagemap's).
func (r *remoteSet) add(id uint64, pid int, vaddr, n uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.tasks[id]
	if t == nil {
		t = &remoteTask{pid: pid}
		r.tasks[id] = t
	}
	t.spans = appendSpan(t.spans, vaddr, vaddr+n*pagestore.PageSize)
	r.pages += n
}

// read serves a fetch request: only whole pages inside one remote range.
func (r *remoteSet) read(id, vaddr uint64, buf []byte) error {
	r.mu.Lock()
	t := r.tasks[id]
	r.mu.Unlock()
	if t == nil {
		return fmt.Errorf("task %d has no pages left at the source", id)
	}
	if n, remote := runAt(t.spans, vaddr, uint64(len(buf))); !remote || n < uint64(len(buf)) {
		return fmt.Errorf("task %d: %d pages at %#x are not all left at the source", id, len(buf)/pagestore.PageSize, vaddr)
	}
	got, err := linux.ReadProcessMemory(t.pid, vaddr, buf)
	if err != nil || got != len(buf) {
		return fmt.Errorf("read %d bytes at %#x of pid %d: got %d: %v", len(buf), vaddr, t.pid, got, err)
	}
	return nil
}

// remove takes pages out of the set (the uffd-wp tracker's pending ranges
// are written since they were sent).
func (s pageSet) remove(vaddr, n uint64) {
	for pn := vaddr / pagestore.PageSize; n > 0; pn, n = pn+1, n-1 {
		if w, ok := s[pn>>6]; ok {
			if w &^= 1 << (pn & 63); w == 0 {
				delete(s, pn>>6)
			} else {
				s[pn>>6] = w
			}
		}
	}
}

// dropDirty forgets, as sent, what the trackers found written since the
// last round: in post-copy those pages are fetched from the held tree.
func (p *precopy) dropDirty() {
	for _, pr := range p.procs {
		set := p.sent[pr.key]
		for _, r := range pr.pending {
			if set != nil {
				set.remove(r.Start, (r.End-r.Start)/pagestore.PageSize)
			}
		}
		pr.pending = pr.pending[:0]
	}
}

// hostPid returns the pid of the tree's process whose pagemap is k: a
// tracked one, else one of the frozen tree (post-copy tracks nothing).
func (p *precopy) hostPid(k pagestore.Key) (int, error) {
	for _, pr := range p.procs {
		if pr.key == k {
			return pr.pid, nil
		}
	}
	if k.Kind != pagestore.KindTask {
		return 0, fmt.Errorf("lazy pages of %v, not a task's", k)
	}
	if p.frozenPids == nil {
		// The tree is frozen: one walk serves every pagemap.
		pids, err := treePids(p.root)
		if err != nil {
			return 0, err
		}
		p.frozenPids = make(map[uint64]int, len(pids))
		for _, pid := range pids {
			if vpid, err := nsPid(pid); err == nil {
				p.frozenPids[vpid] = pid
			}
		}
	}
	if pid, ok := p.frozenPids[k.ID]; ok {
		return pid, nil
	}
	return 0, fmt.Errorf("lazy pages of %v: no process of the tree has that pid", k)
}

// fetchServer is the source's end of the fetch streams.
type fetchServer struct {
	mu      sync.Mutex
	streams [2]*transport.Stream // by pageserver.FetchRole; guarded by mu
	stats   [2]pageserver.FetchServeStats
	wg      sync.WaitGroup
}

// openFetch opens the fault and fill streams, right after the page
// streams (the destination accepts them in that order).
func (s *source) openFetch(ctx context.Context) (*fetchServer, error) {
	fs := &fetchServer{}
	for role := range fs.streams {
		st, err := s.sess.OpenStream(ctx, transport.KindFetch)
		if err == nil {
			err = pageserver.WriteFetchPreface(st, pageserver.FetchRole(role))
		}
		if err != nil {
			fs.close()
			return nil, fmt.Errorf("fetch stream: %w", err)
		}
		fs.streams[role] = st
	}
	return fs, nil
}

// serve answers requests from the remote set until the destination closes
// the streams or close is called.
func (fs *fetchServer) serve(remote *remoteSet, log interface{ Warn(string, ...any) }) {
	fs.mu.Lock()
	streams := fs.streams
	fs.mu.Unlock()
	for role, st := range streams {
		fs.wg.Add(1)
		go func() { // owned by fs: close waits
			defer fs.wg.Done()
			if err := pageserver.ServeFetch(st, remote.read, &fs.stats[role]); err != nil {
				log.Warn("fetch stream ended", "role", pageserver.FetchRole(role), "err", err)
			}
		}()
	}
}

// reattach serves a resumed session's fetch streams; the lost ones'
// servers have ended or end with their session.
func (fs *fetchServer) reattach(streams [2]*transport.Stream, remote *remoteSet, log interface{ Warn(string, ...any) }) {
	fs.mu.Lock()
	fs.streams = streams
	fs.mu.Unlock()
	fs.serve(remote, log)
}

// served returns the pages answered on both streams so far.
func (fs *fetchServer) served() uint64 {
	return fs.stats[pageserver.FetchFaults].Pages.Load() + fs.stats[pageserver.FetchFill].Pages.Load()
}

// close closes the streams and waits for their servers.
func (fs *fetchServer) close() {
	if fs == nil {
		return
	}
	fs.mu.Lock()
	streams := fs.streams
	fs.mu.Unlock()
	for _, st := range streams {
		if st != nil {
			st.Close()
		}
	}
	fs.wg.Wait()
}

// awaitPostcopy waits, after COMMITTED, for the destination to hold every
// page, serving its fetches meanwhile, and records what moved. A lost
// connection is dialled again for PostcopyRecoverTimeout.
func (s *source) awaitPostcopy(ctx context.Context, fs *fetchServer, remote *remoteSet, resumed time.Time) error {
	s.phase(PhasePostcopy)
	st := &PostcopyStats{}
	s.stats.Postcopy = st
	if remote != nil {
		st.RemotePages = remote.pages
	}
	stopProgress := s.postcopyProgress(fs, st.RemotePages)
	defer stopProgress()
	var done *wire.PostcopyDone
	for done == nil {
		stop := deadline(ctx, s.ctlStream, s.cfg.PrepareTimeout)
		m, err := s.ctl.Recv()
		stop()
		switch {
		case err == nil && m.GetPostcopyDone() != nil:
			done = m.GetPostcopyDone()
		case err == nil:
			return fmt.Errorf("destination answered %s during post-copy: %s", wire.Name(m), m.GetAbort().GetReason())
		case ctx.Err() != nil || fs == nil:
			return fmt.Errorf("wait for post-copy's end: %w", err)
		default:
			s.log.Warn("post-copy: connection lost; reconnecting", "err", err, "for", s.cfg.PostcopyRecoverTimeout)
			if rerr := s.reconnect(ctx, fs, remote); rerr != nil {
				return fmt.Errorf("wait for post-copy's end: %w; reconnect: %w", err, rerr)
			}
			st.Recoveries++
		}
	}
	st.MS = ms(time.Since(resumed))
	st.ServedFaultPages = fs.stats[pageserver.FetchFaults].Pages.Load()
	st.ServedFillPages = fs.stats[pageserver.FetchFill].Pages.Load()
	st.RefusedRequests = fs.stats[0].Refused.Load() + fs.stats[1].Refused.Load()
	st.BytesWire = (st.ServedFaultPages + st.ServedFillPages) * pagestore.PageSize
	msOf := func(ns uint64) float64 { return ms(time.Duration(ns)) }
	st.FaultPages, st.PushedPages, st.Faults = done.GetFaultPages(), done.GetPushedPages(), done.GetFaults()
	st.FaultP50MS, st.FaultP99MS, st.FaultMaxMS = msOf(done.GetFaultP50Ns()), msOf(done.GetFaultP99Ns()), msOf(done.GetFaultMaxNs())
	st.RemoteFaultP50MS, st.RemoteFaultP99MS = msOf(done.GetRemoteFaultP50Ns()), msOf(done.GetRemoteFaultP99Ns())
	st.RemoteFaultMaxMS, st.DestFillMS = msOf(done.GetRemoteFaultMaxNs()), msOf(done.GetFillNanos())
	st.LocalFaultP50MS, st.LocalFaultP99MS = msOf(done.GetLocalFaultP50Ns()), msOf(done.GetLocalFaultP99Ns())
	st.LocalFaultMaxMS, st.RemoteFaults, st.LocalFaults = msOf(done.GetLocalFaultMaxNs()), done.GetRemoteFaults(), done.GetLocalFaults()
	s.log.Info("post-copy done", "ms", st.MS, "remote_pages", st.RemotePages, "served_fault_pages", st.ServedFaultPages,
		"served_fill_pages", st.ServedFillPages, "fault_p99_ms", st.FaultP99MS, "remote_fault_p99_ms", st.RemoteFaultP99MS,
		"recoveries", st.Recoveries)
	return nil
}

// errNotCommitted: the destination dropped the migration before COMMIT
// reached it, so the source's held copy is the only one.
var errNotCommitted = errors.New("the destination never committed")

// reconnect dials the destination again until PostcopyRecoverTimeout
// passes, resumes the post-copy there and serves its fetches on the new
// session's streams.
func (s *source) reconnect(ctx context.Context, fs *fetchServer, remote *remoteSet) error {
	deadline := time.Now().Add(s.cfg.PostcopyRecoverTimeout)
	var last error
	for attempt := 1; time.Now().Before(deadline); attempt++ {
		if err := s.resumeSession(ctx, fs, remote, deadline); err != nil {
			if errors.Is(err, errNotCommitted) {
				return err
			}
			last = err
			s.log.Info("post-copy: reconnect failed", "attempt", attempt, "err", err)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(500 * time.Millisecond): // redial pace
			}
			continue
		}
		s.log.Info("post-copy: reconnected", "attempt", attempt)
		return nil
	}
	return fmt.Errorf("no connection within %v: %w", s.cfg.PostcopyRecoverTimeout, last)
}

// resumeSession dials, asks the destination to resume the post-copy and
// hands the new fetch streams to fs.
func (s *source) resumeSession(ctx context.Context, fs *fetchServer, remote *remoteSet, deadline time.Time) error {
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	sess, err := transport.Dial(dctx, s.cfg.To, s.tcfg)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			sess.Close()
		}
	}()
	stream, err := sess.OpenStream(dctx, transport.KindControl)
	if err != nil {
		return fmt.Errorf("control stream: %w", err)
	}
	ctl := wire.NewConn(stream)
	stop := context.AfterFunc(dctx, func() { stream.SetDeadline(time.Now()) })
	defer stop()
	err = ctl.Send(&wire.Message{Body: &wire.Message_Hello{Hello: &wire.Hello{MinVersion: wire.MinVersion, MaxVersion: wire.MaxVersion,
		MigrationId: s.stats.MigrationID, Mode: modeToWire(s.cfg.Mode), Resume: true}}})
	if err != nil {
		return err
	}
	m, err := ctl.Recv()
	if err != nil {
		return fmt.Errorf("resume hello: %w", err)
	}
	if r := m.GetHelloReply(); r.GetNotCommitted() {
		return fmt.Errorf("%w: %s", errNotCommitted, r.GetReason())
	}
	if r := m.GetHelloReply(); r == nil || !r.GetAccepted() {
		return fmt.Errorf("%w: resume: %s", ErrRefused, m.GetHelloReply().GetReason())
	}
	var streams [2]*transport.Stream
	for role := range streams {
		st, err := sess.OpenStream(dctx, transport.KindFetch)
		if err == nil {
			err = pageserver.WriteFetchPreface(st, pageserver.FetchRole(role))
		}
		if err != nil {
			return fmt.Errorf("fetch stream: %w", err)
		}
		streams[role] = st
	}
	ok = true
	old := s.sess
	s.sess, s.ctl, s.ctlStream = sess, ctl, stream
	if old != nil { // nil in a phaul recover
		old.Close()
	}
	fs.reattach(streams, remote, s.log)
	return nil
}

// postcopyProgress reports the pages served so far, every 100 ms to
// Progress, or every second in the log without one, until the returned
// func is called.
func (s *source) postcopyProgress(fs *fetchServer, total uint64) func() {
	if fs == nil {
		return func() {}
	}
	every := time.Second
	if s.cfg.Progress != nil {
		every = 100 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owned by the returned func
		defer wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			served := fs.served()
			left := (total - min(total, served)) * pagestore.PageSize
			if s.cfg.Progress == nil {
				s.log.Info("post-copy", "served_mib", served>>8, "at_source_mib", left>>20)
				continue
			}
			s.cfg.Progress(Event{Phase: PhasePostcopy, Bytes: served * pagestore.PageSize, Elapsed: time.Since(s.stats.start),
				Remaining: left})
		}
	}()
	return func() { cancel(); wg.Wait() }
}

// errPostcopyLost is a post-copy that lost its destination after the
// resume: neither copy is whole.
var errPostcopyLost = errors.New("post-copy interrupted after the destination resumed")

// postcopyLost says exactly which copy holds what when post-copy fails
// after the resume.
func (s *source) postcopyLost(remote *remoteSet, fs *fetchServer, err error) error {
	served := uint64(0)
	if fs != nil {
		served = fs.served()
	}
	total := uint64(0)
	if remote != nil {
		total = remote.pages
	}
	ids := make([]uint64, 0)
	if remote != nil {
		for id := range remote.tasks {
			ids = append(ids, id)
		}
		slices.Sort(ids)
	}
	s.log.Error("post-copy interrupted: the destination runs the tree (pid "+fmt.Sprint(s.stats.DestPID)+
		") and may lack pages only the source's frozen copy held; the source's copy is dropped when phaul ends "+
		"(it must never run again: the destination's has run)",
		"remote_pages", total, "served_pages", served, "tasks", ids, "err", err)
	return fmt.Errorf("%w: %d of %d pages left at the source were served: %w", errPostcopyLost, served, total, err)
}

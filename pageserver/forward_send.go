package pageserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/xxh3"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
)

// Forwarder is a Store that forwards every page to a receiver instead of
// keeping it: zero pages as zero frames, repeated content as references,
// the rest in frames of up to fwdMaxPages pages, gathered into numbered
// batches of about 1 MiB. Batch n goes out on lane n mod lanes, each lane
// a stream with a goroutine of its own (owned by the Forwarder, ended by
// Commit or Close) that zstd-compresses the batch when its policy says that
// is faster on this link and writes it, while the next batches are
// gathered and other lanes compress theirs. It is the source side of a
// migration's page stream; pageserver.Server drives it from one goroutine.
type Forwarder struct {
	cfg    ForwardConfig
	lanes  []*lane
	seen   map[xxh3.Uint128]pageRef // first occurrence of each content
	byRef  map[pageRef]xxh3.Uint128 // the content seen holds for a page
	batch  []byte                   // header room, then frames not sent yet
	seq    uint64                   // number of the next batch
	stats  ForwardStats             // what Add saw; the lanes count the rest
	free   chan []byte              // batch buffers back from the lanes
	closed bool                     // the lanes' inputs are closed

	mu   sync.Mutex // guards comp, err and every lane's st
	comp *compressPolicy
	err  error // the first lane error
}

// lane is one stream of a Forwarder and the goroutine writing to it.
type lane struct {
	rw   io.ReadWriter
	in   chan laneItem
	done chan struct{} // closed when the goroutine has returned
	zenc *zstd.Encoder
	zbuf []byte
	st   LaneStats
}

// laneItem is a batch to send (buf: header room and frames) or, with end
// set, the end frame.
type laneItem struct {
	seq uint64
	buf []byte
	end bool
	// With end: pages and batches sent in all.
	pages, batches uint64
}

// NewForwarder forwards over lanes (1 to MaxLanes streams, the first of
// which also carries the acknowledgement) and reads the acknowledgement
// from the first. The caller owns the streams and must call Commit or
// Close.
func NewForwarder(cfg ForwardConfig, lanes ...io.ReadWriter) (*Forwarder, error) {
	if len(lanes) == 0 || len(lanes) > MaxLanes {
		return nil, fmt.Errorf("forward: %d lanes, want 1 to %d", len(lanes), MaxLanes)
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Minute
	}
	policy, err := newCompressPolicy(cfg.Compress)
	if err != nil {
		return nil, err
	}
	// Compressors run on every lane at once, as far as there are CPUs.
	policy.parallel = float64(min(len(lanes), runtime.NumCPU()))
	policy.lanes = float64(len(lanes))
	f := &Forwarder{cfg: cfg, seen: make(map[xxh3.Uint128]pageRef), byRef: make(map[pageRef]xxh3.Uint128), comp: policy,
		free: make(chan []byte, 2*len(lanes)+1)}
	for range 2 * len(lanes) {
		f.free <- make([]byte, fwdHeaderLen, fwdHeaderLen+fwdMaxBatch)
	}
	f.batch = make([]byte, fwdHeaderLen, fwdHeaderLen+fwdMaxBatch)
	for _, rw := range lanes {
		zenc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
		if err != nil {
			for _, l := range f.lanes {
				l.zenc.Close()
			}
			return nil, fmt.Errorf("zstd: %w", err)
		}
		l := &lane{rw: rw, in: make(chan laneItem, 1), done: make(chan struct{}), zenc: zenc}
		f.lanes = append(f.lanes, l)
	}
	for i, l := range f.lanes {
		go f.run(l, i) // owned by f: Commit and Close wait for it
	}
	return f, nil
}

// run is lane i's goroutine: the lane frame, then its batches and the end
// frame as they come. After an error it only recycles buffers, so the
// gathering side never blocks on a dead stream.
func (f *Forwarder) run(l *lane, i int) {
	defer close(l.done)
	err := f.writeLane(l, fwdHeader{typ: fwdLane, id: uint64(i), nrPages: uint64(len(f.lanes))}.append(nil), false)
	for it := range l.in {
		switch {
		case err != nil:
		case it.end:
			end := fwdHeader{typ: fwdEnd, nrPages: it.pages, vaddr: it.batches}
			err = f.writeLane(l, end.append(nil), false)
		default:
			err = f.sendBatch(l, it)
		}
		if it.buf != nil {
			f.free <- it.buf[:fwdHeaderLen]
		}
	}
	if err != nil {
		f.mu.Lock()
		if f.err == nil {
			f.err = fmt.Errorf("forward: lane %d: %w", i, err)
		}
		f.mu.Unlock()
	}
}

// sendBatch writes batch it on l: one zstd batch frame when the policy
// says so and that is smaller, else the frames raw in one batch frame.
func (f *Forwarder) sendBatch(l *lane, it laneItem) error {
	raw := it.buf[fwdHeaderLen:]
	f.mu.Lock()
	compress := f.comp.shouldCompress(len(raw))
	f.mu.Unlock()
	h := fwdHeader{typ: fwdBatch, enc: encRaw, id: it.seq, length: uint32(len(raw))}
	out := it.buf
	if compress {
		z, cpu := l.encode(raw)
		f.mu.Lock()
		f.comp.compressed(len(raw), len(z)-fwdHeaderLen, cpu)
		f.mu.Unlock()
		if len(z) < len(out) {
			h.enc, h.length, out = encZstd, uint32(len(z)-fwdHeaderLen), z
		}
	}
	var hb [fwdHeaderLen]byte
	copy(out, h.append(hb[:0]))
	f.mu.Lock()
	l.st.Batches++
	l.st.RawBytes += uint64(len(raw))
	if h.enc == encZstd {
		l.st.Compressed++
	}
	f.mu.Unlock()
	return f.writeLane(l, out, h.enc == encZstd)
}

// writeLane writes b on l and tells the policy how long that took.
func (f *Forwarder) writeLane(l *lane, b []byte, compressed bool) error {
	start := time.Now()
	if _, err := l.rw.Write(b); err != nil {
		return err
	}
	d := time.Since(start)
	f.mu.Lock()
	l.st.WireBytes += uint64(len(b))
	f.comp.wrote(uint64(len(b)), d, compressed)
	f.mu.Unlock()
	return nil
}

// encode compresses raw into l.zbuf after header room and returns it with
// the CPU time compressing took: the compressor's own cost, not the time
// other processes on this host (the dumping CRIU, a co-located
// destination) held the CPU meanwhile.
func (l *lane) encode(raw []byte) ([]byte, time.Duration) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0, t0 := linux.ThreadCPUTime(), time.Now()
	if cap(l.zbuf) < fwdHeaderLen {
		l.zbuf = make([]byte, fwdHeaderLen, fwdHeaderLen+fwdMaxBatch)
	}
	l.zbuf = l.zenc.EncodeAll(raw, l.zbuf[:fwdHeaderLen])
	cpu := linux.ThreadCPUTime() - c0
	if cpu <= 0 {
		cpu = time.Since(t0)
	}
	return l.zbuf, cpu
}

// sendErr returns the first lane error, if any.
func (f *Forwarder) sendErr() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// Stats returns what was forwarded so far.
func (f *Forwarder) Stats() ForwardStats {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.stats
	st.Lanes = nil
	for _, l := range f.lanes {
		st.Lanes = append(st.Lanes, l.st)
		st.WireBytes += l.st.WireBytes
		st.Batches += l.st.Batches
		st.Compressed += l.st.Compressed
	}
	st.LinkMBps, st.ZstdMBps = f.comp.linkRate/1e6, f.comp.compRate/1e6
	st.ZstdRatio, st.Switches = f.comp.ratio, f.comp.switches
	return st
}

// write adds one frame to the current batch; a batch that reached
// fwdBatchTarget, or would pass fwdMaxBatch with this frame, goes out
// first.
func (f *Forwarder) write(h fwdHeader, payload []byte) error {
	h.length = uint32(len(payload))
	// The batch's frames (after the header room) plus this one.
	if len(f.batch) > fwdHeaderLen && len(f.batch)+len(payload) > fwdMaxBatch {
		if err := f.flushBatch(); err != nil {
			return err
		}
	}
	f.batch = h.append(f.batch)
	f.batch = append(f.batch, payload...)
	if len(f.batch)-fwdHeaderLen >= fwdBatchTarget {
		return f.flushBatch()
	}
	return nil
}

// flushBatch hands the current batch to its lane.
func (f *Forwarder) flushBatch() error {
	if len(f.batch) == fwdHeaderLen {
		return f.sendErr()
	}
	if f.closed {
		return errors.New("forward: forwarder closed")
	}
	it := laneItem{seq: f.seq, buf: f.batch}
	l := f.lanes[f.seq%uint64(len(f.lanes))]
	next, err := f.buffer()
	if err != nil {
		return err
	}
	f.seq++
	f.batch = next
	select {
	case l.in <- it:
	case <-l.done:
	}
	return f.sendErr()
}

// buffer returns a free batch buffer, or a lane's error.
func (f *Forwarder) buffer() ([]byte, error) {
	for {
		select {
		case b := <-f.free:
			return b, nil
		case <-time.After(100 * time.Millisecond):
			// A lane that failed recycles its buffers; one that is
			// blocked writing does not, and then waiting is right.
			if err := f.sendErr(); err != nil {
				return nil, err
			}
		}
	}
}

// Open implements Store: the receiver opens the same pagemap.
func (f *Forwarder) Open(k pagestore.Key) (bool, error) {
	return false, f.write(fwdHeader{typ: fwdOpen, kind: k.Kind, id: k.ID}, nil)
}

// Add implements Store.
func (f *Forwarder) Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	if flags&pagestore.FlagPresent == 0 {
		f.stats.Entries++
		return f.write(fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: vaddr, nrPages: nrPages, flags: flags}, nil)
	}
	if uint64(len(data)) != nrPages*pagestore.PageSize {
		return fmt.Errorf("forward: %d bytes for %d pages", len(data), nrPages)
	}
	f.stats.Pages += nrPages
	// Runs of data pages go out together; zero and duplicate pages cut
	// them.
	runStart := uint64(0)
	flush := func(end uint64) error {
		for runStart < end {
			n := min(end-runStart, fwdMaxPages)
			if err := f.sendData(k, vaddr+runStart*pagestore.PageSize, data[runStart*pagestore.PageSize:(runStart+n)*pagestore.PageSize]); err != nil {
				return err
			}
			runStart += n
		}
		return nil
	}
	for i := uint64(0); i < nrPages; {
		page := data[i*pagestore.PageSize : (i+1)*pagestore.PageSize]
		here := pageRef{k.Kind, k.ID, vaddr + i*pagestore.PageSize}
		f.forget(here)
		if isZero(page) {
			if err := flush(i); err != nil {
				return err
			}
			j := i + 1
			for j < nrPages && isZero(data[j*pagestore.PageSize:(j+1)*pagestore.PageSize]) {
				f.forget(pageRef{k.Kind, k.ID, vaddr + j*pagestore.PageSize})
				j++
			}
			if err := f.write(fwdHeader{typ: fwdZero, kind: k.Kind, id: k.ID, vaddr: vaddr + i*pagestore.PageSize, nrPages: j - i}, nil); err != nil {
				return err
			}
			f.stats.ZeroPages += j - i
			i, runStart = j, j
			continue
		}
		sum := xxh3.Hash128(page)
		if ref, ok := f.seen[sum]; ok {
			if err := flush(i); err != nil {
				return err
			}
			if err := f.sendDup(k, here.vaddr, sum, ref); err != nil {
				return err
			}
			i++
			runStart = i
			continue
		}
		f.seen[sum] = here
		f.byRef[here] = sum
		i++
	}
	return flush(nrPages)
}

// forget drops the page at r as a reference for duplicates: a new copy of
// it is being sent (pre-copy re-sends pages), and a dup naming its old
// content would no longer match on the receiver.
func (f *Forwarder) forget(r pageRef) {
	sum, ok := f.byRef[r]
	if !ok {
		return
	}
	delete(f.byRef, r)
	if f.seen[sum] == r {
		delete(f.seen, sum)
	}
}

func (f *Forwarder) sendDup(k pagestore.Key, vaddr uint64, sum xxh3.Uint128, ref pageRef) error {
	var p [fwdDupLen]byte
	binary.BigEndian.PutUint64(p[0:], sum.Hi)
	binary.BigEndian.PutUint64(p[8:], sum.Lo)
	p[16] = byte(ref.kind)
	binary.BigEndian.PutUint64(p[24:], ref.id)
	binary.BigEndian.PutUint64(p[32:], ref.vaddr)
	f.stats.DupPages++
	return f.write(fwdHeader{typ: fwdDup, kind: k.Kind, id: k.ID, vaddr: vaddr, nrPages: 1}, p[:])
}

func (f *Forwarder) sendData(k pagestore.Key, vaddr uint64, pages []byte) error {
	n := uint64(len(pages)) / pagestore.PageSize
	f.stats.DataPages += n
	f.stats.RawBytes += uint64(len(pages))
	return f.write(fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, vaddr: vaddr, nrPages: n}, pages)
}

// BeginFinal starts the final set on the receiver's store: from here on,
// only pages sent or kept count (pagestore.Store.BeginFinal).
func (f *Forwarder) BeginFinal() error {
	return f.write(fwdHeader{typ: fwdFinal}, nil)
}

// Keep tells the receiver that nrPages pages at vaddr, sent before, belong
// to the final set as they are.
func (f *Forwarder) Keep(k pagestore.Key, vaddr, nrPages uint64) error {
	f.stats.Kept += nrPages
	return f.write(fwdHeader{typ: fwdKeep, kind: k.Kind, id: k.ID, vaddr: vaddr, nrPages: nrPages}, nil)
}

// Read implements Store: a forwarder keeps no pages.
func (f *Forwarder) Read(k pagestore.Key, vaddr uint64, buf []byte) error {
	return fmt.Errorf("forward: %w: pages are on the destination", pagestore.ErrNotFound)
}

// Commit implements Store: it ends every lane and waits until the receiver
// has stored and committed every page.
func (f *Forwarder) Commit() error {
	if err := f.flushBatch(); err != nil {
		return err
	}
	if f.closed {
		return errors.New("forward: forwarder closed")
	}
	for _, l := range f.lanes {
		select {
		case l.in <- laneItem{end: true, pages: f.stats.Pages, batches: f.seq}:
		case <-l.done:
		}
	}
	f.stop()
	if err := f.sendErr(); err != nil {
		return err
	}
	ackLane := f.lanes[0].rw
	if d, ok := ackLane.(deadliner); ok {
		d.SetReadDeadline(time.Now().Add(f.cfg.AckTimeout))
		defer d.SetReadDeadline(time.Time{})
	}
	var a [fwdHeaderLen]byte
	if _, err := io.ReadFull(ackLane, a[:]); err != nil {
		return fmt.Errorf("forward: wait for the receiver: %w", err)
	}
	h, err := decodeFwdHeader(a[:])
	if err != nil {
		return err
	}
	if h.typ != fwdAck {
		return fmt.Errorf("%w: type %d where the ack belongs", ErrForward, h.typ)
	}
	if h.flags != 0 {
		return fmt.Errorf("forward: the receiver failed to store the pages (status %d)", h.flags)
	}
	return nil
}

// stop ends the lanes after what they were handed and waits for them.
func (f *Forwarder) stop() {
	if !f.closed {
		f.closed = true
		for _, l := range f.lanes {
			close(l.in)
		}
	}
	for _, l := range f.lanes {
		<-l.done
	}
}

// Close stops the lanes, dropping a batch not handed to them, and releases
// the compressors. The caller closes the streams first if a lane may be
// blocked writing to one.
func (f *Forwarder) Close() error {
	f.stop()
	var err error
	for _, l := range f.lanes {
		err = errors.Join(err, l.zenc.Close())
	}
	return err
}

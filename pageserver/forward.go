package pageserver

import (
	"bufio"
	"bytes"
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

// The forward protocol carries pages from the source's agent (a Forwarder,
// the Store behind the page server CRIU dumps into) to the destination's
// store (Receive), on one yamux stream. forward.md beside this file is its
// specification.

const (
	fwdVersion   = 1
	fwdHeaderLen = 40
	// fwdMaxPages bounds one pages frame; its payload (raw or zstd) is
	// bounded by fwdMaxPayload.
	fwdMaxPages   = 256
	fwdMaxPayload = fwdMaxPages*pagestore.PageSize + 64<<10
	// A batch frame's payload decodes to at most fwdMaxBatch bytes of
	// frames; the sender closes a batch once it holds fwdBatchTarget.
	fwdMaxBatch    = 2 << 20
	fwdBatchTarget = 1 << 20
	fwdDupLen      = 16 + 24 // hash, ref kind+pad, ref id, ref vaddr
)

type fwdType uint8

const (
	fwdOpen  fwdType = 1 // open pagemap (kind, id)
	fwdPages fwdType = 2 // nrPages present pages; payload raw or zstd
	fwdZero  fwdType = 3 // nrPages present zero pages, no payload
	fwdDup   fwdType = 4 // one page equal to a page sent earlier
	fwdEntry fwdType = 5 // pages without content here (lazy, parent)
	fwdEnd   fwdType = 6 // no more frames; nrPages = pages sent in all
	fwdAck   fwdType = 7 // receiver to sender: stored and committed; flags = 0 ok
	fwdBatch fwdType = 8 // zstd of a run of open, pages, zero, dup and entry frames
)

const (
	encRaw  = 0
	encZstd = 1
)

// ErrForward is wrapped by every malformed forward frame.
var ErrForward = errors.New("pageserver: malformed forward frame")

type fwdHeader struct {
	typ     fwdType
	kind    pagestore.Kind
	enc     uint8
	length  uint32 // payload bytes
	id      uint64
	vaddr   uint64
	nrPages uint64
	flags   uint32
}

func (h fwdHeader) append(b []byte) []byte {
	var a [fwdHeaderLen]byte
	a[0], a[1], a[2], a[3] = fwdVersion, byte(h.typ), byte(h.kind), h.enc
	binary.BigEndian.PutUint32(a[4:], h.length)
	binary.BigEndian.PutUint64(a[8:], h.id)
	binary.BigEndian.PutUint64(a[16:], h.vaddr)
	binary.BigEndian.PutUint64(a[24:], h.nrPages)
	binary.BigEndian.PutUint32(a[32:], h.flags)
	return append(b, a[:]...)
}

func decodeFwdHeader(a []byte) (fwdHeader, error) {
	h := fwdHeader{
		typ: fwdType(a[1]), kind: pagestore.Kind(a[2]), enc: a[3],
		length: binary.BigEndian.Uint32(a[4:]), id: binary.BigEndian.Uint64(a[8:]),
		vaddr: binary.BigEndian.Uint64(a[16:]), nrPages: binary.BigEndian.Uint64(a[24:]),
		flags: binary.BigEndian.Uint32(a[32:]),
	}
	if a[0] != fwdVersion {
		return h, fmt.Errorf("%w: version %d", ErrForward, a[0])
	}
	if binary.BigEndian.Uint32(a[36:]) != 0 {
		return h, fmt.Errorf("%w: reserved bytes set", ErrForward)
	}
	if h.length > fwdMaxPayload {
		return h, fmt.Errorf("%w: payload of %d bytes", ErrForward, h.length)
	}
	want := -1 // payload length each type demands; -1: checked below
	switch h.typ {
	case fwdOpen, fwdZero, fwdEntry, fwdEnd, fwdAck:
		want = 0
	case fwdDup:
		want = fwdDupLen
		if h.nrPages != 1 {
			return h, fmt.Errorf("%w: dup of %d pages", ErrForward, h.nrPages)
		}
	case fwdPages:
		if h.nrPages == 0 || h.nrPages > fwdMaxPages {
			return h, fmt.Errorf("%w: %d pages in one frame", ErrForward, h.nrPages)
		}
		want = int(h.nrPages) * pagestore.PageSize
	case fwdBatch:
		if h.enc != encZstd || h.length == 0 || h.kind != 0 || h.id != 0 || h.vaddr != 0 || h.nrPages != 0 || h.flags != 0 {
			return h, fmt.Errorf("%w: batch header %+v", ErrForward, h)
		}
	default:
		return h, fmt.Errorf("%w: type %d", ErrForward, h.typ)
	}
	switch h.typ {
	case fwdOpen, fwdPages, fwdZero, fwdDup, fwdEntry:
		if err := checkFwdKey(h.kind, h.id); err != nil {
			return h, err
		}
	}
	switch h.typ {
	case fwdPages, fwdZero, fwdDup, fwdEntry:
		// A range inside user address space, page aligned, not wrapping.
		if h.nrPages == 0 || h.vaddr%pagestore.PageSize != 0 || h.vaddr >= MaxAddress ||
			h.nrPages > (MaxAddress-h.vaddr)/pagestore.PageSize {
			return h, fmt.Errorf("%w: range %#x + %d pages", ErrForward, h.vaddr, h.nrPages)
		}
	}
	if h.typ != fwdBatch && h.enc != encRaw {
		return h, fmt.Errorf("%w: encoding %d on type %d", ErrForward, h.enc, h.typ)
	}
	if want >= 0 && int(h.length) != want {
		return h, fmt.Errorf("%w: type %d with %d payload bytes", ErrForward, h.typ, h.length)
	}
	return h, nil
}

// checkFwdKey bounds a pagemap identity from the wire.
func checkFwdKey(kind pagestore.Kind, id uint64) error {
	switch {
	case kind == pagestore.KindTask && (id == 0 || id > MaxPID):
		return fmt.Errorf("%w: task id %d", ErrForward, id)
	case kind == pagestore.KindShmem && id >= 1<<56: // CRIU's dst_id keeps 56 bits
		return fmt.Errorf("%w: shmem id %d", ErrForward, id)
	case kind != pagestore.KindTask && kind != pagestore.KindShmem:
		return fmt.Errorf("%w: pagemap kind %d", ErrForward, kind)
	}
	return nil
}

// ForwardStats counts what crossed one forward stream.
type ForwardStats struct {
	Pages      uint64 `json:"pages"`      // present pages, all kinds
	ZeroPages  uint64 `json:"zero_pages"` // sent as zero frames, no bytes
	DupPages   uint64 `json:"dup_pages"`  // sent as references to an earlier page
	DataPages  uint64 `json:"data_pages"` // sent with their bytes
	RawBytes   uint64 `json:"raw_bytes"`  // bytes of data pages before compression
	WireBytes  uint64 `json:"wire_bytes"` // frame bytes written, headers included
	Compressed uint64 `json:"compressed"` // batches of frames sent zstd-compressed
	Entries    uint64 `json:"entries"`    // content-less ranges (lazy, parent)
	// What the compression policy measured last (auto mode; 0: never):
	// the link's rate over raw frames and the compressor's, in MB/s, and
	// the compressed/raw ratio.
	LinkMBps  float64 `json:"link_mbps"`
	ZstdMBps  float64 `json:"zstd_mbps"`
	ZstdRatio float64 `json:"zstd_ratio"`
	Switches  uint64  `json:"compress_switches"` // times auto turned zstd on or off
}

// ForwardConfig configures a Forwarder.
type ForwardConfig struct {
	// Compress: "auto" measures and switches zstd on when the link is
	// slower than the compressor on this data; "on"; "off".
	Compress string
	// AckTimeout bounds the wait for the receiver's acknowledgement at
	// Commit.
	AckTimeout time.Duration
}

type pageRef struct {
	kind  pagestore.Kind
	id    uint64
	vaddr uint64
}

// deadliner is what a stream offers to bound the acknowledgement wait.
type deadliner interface {
	SetReadDeadline(time.Time) error
}

// Forwarder is a Store that forwards every page to a receiver instead of
// keeping it: zero pages as zero frames, repeated content as references,
// the rest in frames of up to fwdMaxPages pages, gathered into batches
// that go out zstd-compressed when that is faster on this link. It is the
// source side of a migration's page stream; pageserver.Server drives it
// from one goroutine. A sender goroutine, owned by the Forwarder and ended
// by Commit or Close, writes batches to the stream while the next one is
// gathered and compressed.
type Forwarder struct {
	rw    io.ReadWriter
	cfg   ForwardConfig
	seen  map[xxh3.Uint128]pageRef // first occurrence of each content
	batch []byte                   // frames not sent yet
	zenc  *zstd.Encoder
	stats ForwardStats // WireBytes excepted: the sender's

	out    chan outBatch // to the sender
	free   chan []byte   // buffers back from the sender
	done   chan struct{} // closed when the sender has returned
	closed bool          // out is closed

	mu   sync.Mutex // guards comp, wire and err
	comp *compressPolicy
	wire uint64 // bytes the sender wrote
	err  error  // the sender's first error
}

// outBatch is what the sender writes: wire, one batch frame or a run of
// plain frames.
type outBatch struct {
	wire       []byte
	compressed bool
}

// fwdBuffers batch buffers circulate between the Forwarder and its sender:
// one gathering, one compressed, one being written.
const fwdBuffers = 4

// NewForwarder writes frames to rw and reads the acknowledgement from it.
// The caller owns rw and must call Commit or Close.
func NewForwarder(rw io.ReadWriter, cfg ForwardConfig) (*Forwarder, error) {
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Minute
	}
	policy, err := newCompressPolicy(cfg.Compress)
	if err != nil {
		return nil, err
	}
	zenc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	f := &Forwarder{rw: rw, cfg: cfg, seen: make(map[xxh3.Uint128]pageRef), zenc: zenc, comp: policy,
		out: make(chan outBatch, 1), free: make(chan []byte, fwdBuffers), done: make(chan struct{})}
	for range fwdBuffers - 1 {
		f.free <- make([]byte, 0, fwdMaxBatch+fwdHeaderLen)
	}
	f.batch = make([]byte, 0, fwdMaxBatch+fwdHeaderLen)
	go f.send() // owned by f: Commit and Close wait for it
	return f, nil
}

// send writes batches until out closes; after an error it only recycles
// buffers, so the gathering side never blocks on a dead stream.
func (f *Forwarder) send() {
	defer close(f.done)
	var failed bool
	for b := range f.out {
		if !failed {
			start := time.Now()
			_, err := f.rw.Write(b.wire)
			f.mu.Lock()
			if err != nil {
				f.err, failed = fmt.Errorf("forward: %w", err), true
			} else {
				f.wire += uint64(len(b.wire))
				f.comp.wrote(uint64(len(b.wire)), time.Since(start), b.compressed)
			}
			f.mu.Unlock()
		}
		f.free <- b.wire[:0]
	}
}

// sendErr returns the sender's error, if any.
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
	st.WireBytes = f.wire
	st.LinkMBps, st.ZstdMBps = f.comp.linkRate/1e6, f.comp.compRate/1e6
	st.ZstdRatio, st.Switches = f.comp.ratio, f.comp.switches
	return st
}

// write adds one frame to the current batch; a batch that reached
// fwdBatchTarget, or would pass fwdMaxBatch with this frame, goes out
// first.
func (f *Forwarder) write(h fwdHeader, payload []byte) error {
	h.length = uint32(len(payload))
	if len(f.batch) > 0 && len(f.batch)+fwdHeaderLen+len(payload) > fwdMaxBatch {
		if err := f.flushBatch(); err != nil {
			return err
		}
	}
	f.batch = h.append(f.batch)
	f.batch = append(f.batch, payload...)
	if len(f.batch) >= fwdBatchTarget {
		return f.flushBatch()
	}
	return nil
}

// flushBatch hands the current batch to the sender: as one zstd batch
// frame when the policy says so and that is smaller, else as its frames.
func (f *Forwarder) flushBatch() error {
	if len(f.batch) == 0 {
		return f.sendErr()
	}
	if f.closed {
		return errors.New("forward: forwarder closed")
	}
	raw := f.batch
	f.mu.Lock()
	compress := f.comp.shouldCompress(len(raw))
	f.mu.Unlock()
	b := outBatch{wire: raw}
	next, err := f.buffer()
	if err != nil {
		return err
	}
	if compress {
		z, cpu := f.encode(raw, next)
		f.mu.Lock()
		f.comp.compressed(len(raw), len(z)-fwdHeaderLen, cpu)
		f.mu.Unlock()
		if len(z) < len(raw) && len(z)-fwdHeaderLen <= fwdMaxPayload {
			f.stats.Compressed++
			b, next = outBatch{wire: z, compressed: true}, raw[:0]
		} else {
			next = z[:0]
		}
	}
	f.batch = next
	select {
	case f.out <- b:
	case <-f.done:
	}
	return f.sendErr()
}

// buffer returns a free batch buffer, or the sender's error.
func (f *Forwarder) buffer() ([]byte, error) {
	select {
	case b := <-f.free:
		return b, nil
	case <-f.done:
		if err := f.sendErr(); err != nil {
			return nil, err
		}
		return nil, errors.New("forward: sender stopped")
	}
}

// encode compresses a batch into dst as a batch frame (header and zstd
// payload) and returns the CPU time compressing took: the compressor's own
// cost, not the time other processes on this host (the dumping CRIU, a
// co-located destination) held the CPU meanwhile.
func (f *Forwarder) encode(raw, dst []byte) ([]byte, time.Duration) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c0, t0 := linux.ThreadCPUTime(), time.Now()
	dst = append(dst[:0], make([]byte, fwdHeaderLen)...)
	dst = f.zenc.EncodeAll(raw, dst)
	cpu := linux.ThreadCPUTime() - c0
	if cpu <= 0 {
		cpu = time.Since(t0)
	}
	h := fwdHeader{typ: fwdBatch, enc: encZstd, length: uint32(len(dst) - fwdHeaderLen)}
	var hb [fwdHeaderLen]byte
	copy(dst, h.append(hb[:0]))
	return dst, cpu
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
		if isZero(page) {
			if err := flush(i); err != nil {
				return err
			}
			j := i + 1
			for j < nrPages && isZero(data[j*pagestore.PageSize:(j+1)*pagestore.PageSize]) {
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
		here := pageRef{k.Kind, k.ID, vaddr + i*pagestore.PageSize}
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
		i++
	}
	return flush(nrPages)
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

// Read implements Store: a forwarder keeps no pages.
func (f *Forwarder) Read(k pagestore.Key, vaddr uint64, buf []byte) error {
	return fmt.Errorf("forward: %w: pages are on the destination", pagestore.ErrNotFound)
}

// Commit implements Store: it ends the stream and waits until the receiver
// has stored and committed every page.
func (f *Forwarder) Commit() error {
	if err := f.flushBatch(); err != nil {
		return err
	}
	end, err := f.buffer()
	if err != nil {
		return err
	}
	select {
	case f.out <- outBatch{wire: fwdHeader{typ: fwdEnd, nrPages: f.stats.Pages}.append(end)}:
	case <-f.done:
	}
	f.stop()
	if err := f.sendErr(); err != nil {
		return err
	}
	if d, ok := f.rw.(deadliner); ok {
		d.SetReadDeadline(time.Now().Add(f.cfg.AckTimeout))
		defer d.SetReadDeadline(time.Time{})
	}
	var a [fwdHeaderLen]byte
	if _, err := io.ReadFull(f.rw, a[:]); err != nil {
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

// stop ends the sender after what it was handed and waits for it.
func (f *Forwarder) stop() {
	if !f.closed {
		f.closed = true
		close(f.out)
	}
	<-f.done
}

// Close stops the sender, dropping a batch not handed to it, and releases
// the compressor. The caller closes the stream first if the sender may be
// blocked writing to it.
func (f *Forwarder) Close() error {
	f.stop()
	return f.zenc.Close()
}

var zeroPage [pagestore.PageSize]byte

func isZero(p []byte) bool { return bytes.Equal(p, zeroPage[:]) }

// ReceiveStore is what Receive fills: *pagestore.Store.
type ReceiveStore interface {
	Open(k pagestore.Key) (bool, error)
	Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error
	AddZero(k pagestore.Key, vaddr, nrPages uint64) error
	Read(k pagestore.Key, vaddr uint64, buf []byte) error
	Commit() error
}

// Receive reads a forward stream from rw into store until its end frame,
// commits the store and acknowledges. Every frame is checked before it is
// used; a malformed one is an error wrapping ErrForward, and the store is
// not committed. It returns what it received.
func Receive(rw io.ReadWriter, store ReceiveStore) (ForwardStats, error) {
	r := receiver{store: store, opened: make(map[pagestore.Key]bool)}
	br := bufio.NewReaderSize(rw, 1<<20)
	zdec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(fwdMaxBatch))
	if err != nil {
		return r.st, fmt.Errorf("zstd: %w", err)
	}
	defer zdec.Close()
	payload := make([]byte, 0, fwdMaxPayload)
	batch := make([]byte, 0, fwdMaxBatch)
	r.page = make([]byte, pagestore.PageSize)
	ack := func(status uint32) error {
		_, err := rw.Write(fwdHeader{typ: fwdAck, flags: status}.append(nil))
		return err
	}
	var hb [fwdHeaderLen]byte
	for {
		if _, err := io.ReadFull(br, hb[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return r.st, fmt.Errorf("receive pages: %w", err)
		}
		h, err := decodeFwdHeader(hb[:])
		if err != nil {
			return r.st, err
		}
		r.st.WireBytes += fwdHeaderLen + uint64(h.length)
		payload = payload[:h.length] // bounded by decodeFwdHeader
		if _, err := io.ReadFull(br, payload); err != nil {
			return r.st, fmt.Errorf("receive pages: %w", io.ErrUnexpectedEOF)
		}
		switch h.typ {
		case fwdEnd:
			if h.nrPages != r.st.Pages {
				ack(1)
				return r.st, fmt.Errorf("%w: end says %d pages, received %d", ErrForward, h.nrPages, r.st.Pages)
			}
			if err := store.Commit(); err != nil {
				ack(2)
				return r.st, fmt.Errorf("receive pages: %w", err)
			}
			return r.st, ack(0)
		case fwdBatch:
			// The decoder refuses output beyond fwdMaxBatch.
			batch, err = zdec.DecodeAll(payload, batch[:0])
			if err != nil {
				return r.st, fmt.Errorf("%w: batch: %w", ErrForward, err)
			}
			r.st.Compressed++
			if err := r.batch(batch); err != nil {
				return r.st, err
			}
		default:
			if err := r.frame(h, payload); err != nil {
				return r.st, err
			}
		}
	}
}

// receiver applies frames to a store.
type receiver struct {
	store  ReceiveStore
	st     ForwardStats
	opened map[pagestore.Key]bool // bounded by the store's key limit
	page   []byte                 // one page, for dup checks
}

// batch applies the frames a batch frame decoded to: whole frames of the
// kinds a batch may hold, nothing left over.
func (r *receiver) batch(b []byte) error {
	for len(b) > 0 {
		if len(b) < fwdHeaderLen {
			return fmt.Errorf("%w: batch ends inside a header", ErrForward)
		}
		h, err := decodeFwdHeader(b[:fwdHeaderLen])
		if err != nil {
			return fmt.Errorf("batch: %w", err)
		}
		b = b[fwdHeaderLen:]
		if uint64(h.length) > uint64(len(b)) {
			return fmt.Errorf("%w: batch ends inside a frame's payload", ErrForward)
		}
		switch h.typ {
		case fwdOpen, fwdPages, fwdZero, fwdDup, fwdEntry:
		default:
			return fmt.Errorf("%w: type %d inside a batch", ErrForward, h.typ)
		}
		if err := r.frame(h, b[:h.length]); err != nil {
			return err
		}
		b = b[h.length:]
	}
	return nil
}

// frame applies one checked open, pages, zero, dup or entry frame.
func (r *receiver) frame(h fwdHeader, payload []byte) error {
	k := pagestore.Key{Kind: h.kind, ID: h.id}
	switch h.typ {
	case fwdPages, fwdZero, fwdDup, fwdEntry:
		if !r.opened[k] {
			return fmt.Errorf("%w: pages for %s before its open frame", ErrForward, k)
		}
	}
	var err error
	switch h.typ {
	case fwdOpen:
		if _, err = r.store.Open(k); err == nil {
			r.opened[k] = true
		}
	case fwdEntry:
		r.st.Entries++
		err = r.store.Add(k, h.vaddr, h.nrPages, h.flags, nil)
	case fwdZero:
		r.st.Pages += h.nrPages
		r.st.ZeroPages += h.nrPages
		err = r.store.AddZero(k, h.vaddr, h.nrPages)
	case fwdDup:
		err = receiveDup(r.store, k, h.vaddr, payload, r.page)
		r.st.Pages++
		r.st.DupPages++
	case fwdPages:
		r.st.Pages += h.nrPages
		r.st.DataPages += h.nrPages
		r.st.RawBytes += uint64(len(payload))
		err = r.store.Add(k, h.vaddr, h.nrPages, pagestore.FlagPresent, payload)
	default:
		err = fmt.Errorf("%w: unexpected type %d", ErrForward, h.typ)
	}
	if err != nil {
		return fmt.Errorf("receive pages at %s %#x: %w", k, h.vaddr, err)
	}
	return nil
}

// receiveDup stores a page equal to one stored before, after checking that
// the stored page still has that content.
func receiveDup(store ReceiveStore, k pagestore.Key, vaddr uint64, p, page []byte) error {
	sum := xxh3.Uint128{Hi: binary.BigEndian.Uint64(p[0:]), Lo: binary.BigEndian.Uint64(p[8:])}
	ref := pagestore.Key{Kind: pagestore.Kind(p[16]), ID: binary.BigEndian.Uint64(p[24:])}
	refVaddr := binary.BigEndian.Uint64(p[32:])
	if err := checkFwdKey(ref.Kind, ref.ID); err != nil {
		return fmt.Errorf("dup reference: %w", err)
	}
	if err := store.Read(ref, refVaddr, page); err != nil {
		return fmt.Errorf("%w: dup of %s %#x: %w", ErrForward, ref, refVaddr, err)
	}
	if xxh3.Hash128(page) != sum {
		return fmt.Errorf("%w: dup of %s %#x: content differs", ErrForward, ref, refVaddr)
	}
	return store.Add(k, vaddr, 1, pagestore.FlagPresent, page)
}

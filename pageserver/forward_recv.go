package pageserver

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/xxh3"

	"github.com/phaul/phaul/core/pagestore"
)

// ReceiveStore is what Receive fills: *pagestore.Store.
type ReceiveStore interface {
	Open(k pagestore.Key) (bool, error)
	Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error
	AddZero(k pagestore.Key, vaddr, nrPages uint64) error
	Read(k pagestore.Key, vaddr uint64, buf []byte) error
	BeginFinal() error
	Keep(k pagestore.Key, vaddr, nrPages uint64) error
	Commit() error
}

// ReadLane reads the frame that opens a lane and returns the lane's index
// and how many lanes the session has. The destination reads it from the
// first page stream to learn how many more to accept.
func ReadLane(r io.Reader) (idx, lanes int, err error) {
	var a [fwdHeaderLen]byte
	if _, err := io.ReadFull(r, a[:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, 0, fmt.Errorf("receive pages: lane frame: %w", err)
	}
	h, err := decodeFwdHeader(a[:])
	if err != nil {
		return 0, 0, err
	}
	if h.typ != fwdLane {
		return 0, 0, fmt.Errorf("%w: type %d where the lane frame belongs", ErrForward, h.typ)
	}
	return int(h.id), int(h.nrPages), nil // bounded by decodeFwdHeader
}

// Receive reads a one-lane forward session from rw into store: see
// ReceiveLanes.
func Receive(rw io.ReadWriter, store ReceiveStore) (ForwardStats, error) {
	idx, n, err := ReadLane(rw)
	if err != nil {
		return ForwardStats{}, err
	}
	if idx != 0 || n != 1 {
		return ForwardStats{}, fmt.Errorf("%w: lane %d of %d on a one-lane session", ErrForward, idx, n)
	}
	return ReceiveLanes(store, rw)
}

// ReceiveLanes reads a forward session from its lanes (in lane order,
// their lane frames already read with ReadLane) into store until every
// lane's end frame, applying the batches in their order whatever lane they
// came on; then it commits the store and acknowledges on lane 0. Every
// frame is checked before it is used; a malformed one is an error wrapping
// ErrForward, the other lanes stop (lanes with SetReadDeadline are woken)
// and the store is not committed. It returns what it received.
func ReceiveLanes(store ReceiveStore, lanes ...io.ReadWriter) (ForwardStats, error) {
	r := &receiver{store: store, opened: make(map[pagestore.Key]bool), parent: make(map[pagestore.Key]bool),
		page: make([]byte, pagestore.PageSize)}
	r.st.Lanes = make([]LaneStats, len(lanes))
	if len(lanes) == 0 || len(lanes) > MaxLanes {
		return r.st, fmt.Errorf("receive pages: %d lanes", len(lanes))
	}
	g := newGate(len(lanes))
	ends := make([]fwdHeader, len(lanes))
	errs := make([]error, len(lanes))
	var wg sync.WaitGroup
	for i, rw := range lanes {
		wg.Add(1)
		go func() { // owned here: waited for below
			defer wg.Done()
			ends[i], errs[i] = r.lane(g, i, len(lanes), rw)
			if errs[i] != nil {
				g.fail(errs[i])
				for _, o := range lanes {
					if d, ok := o.(deadliner); ok {
						d.SetReadDeadline(time.Now())
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, l := range r.st.Lanes {
		r.st.WireBytes += l.WireBytes
		r.st.Batches += l.Batches
		r.st.Compressed += l.Compressed
	}
	if err := g.cause(); err != nil {
		return r.st, err
	}
	ack := func(status uint32) error {
		_, err := lanes[0].Write(fwdHeader{typ: fwdAck, flags: status}.append(nil))
		return err
	}
	for i, e := range ends {
		if e.nrPages != r.st.Pages || e.vaddr != g.next {
			ack(1)
			return r.st, fmt.Errorf("%w: lane %d ends at %d pages, %d batches; received %d pages, %d batches",
				ErrForward, i, e.nrPages, e.vaddr, r.st.Pages, g.next)
		}
	}
	if err := store.Commit(); err != nil {
		ack(2)
		return r.st, fmt.Errorf("receive pages: %w", err)
	}
	return r.st, ack(0)
}

// lane reads lane i of n until its end frame: batches numbered i, i+n,
// i+2n, ... each decoded here and applied when its turn comes.
func (r *receiver) lane(g *gate, i, n int, rw io.Reader) (fwdHeader, error) {
	br := bufio.NewReaderSize(rw, 256<<10)
	zdec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(fwdMaxBatch))
	if err != nil {
		return fwdHeader{}, fmt.Errorf("zstd: %w", err)
	}
	defer zdec.Close()
	// Grown to what frames need, at most fwdMaxBatch (bounded by
	// decodeFwdHeader and the decoder).
	var payload, decoded []byte
	st := &r.st.Lanes[i]        // this goroutine's own
	st.WireBytes = fwdHeaderLen // the lane frame, read before
	next := uint64(i)           // the only batch number this lane may carry next
	var hb [fwdHeaderLen]byte
	for {
		if _, err := io.ReadFull(br, hb[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fwdHeader{}, fmt.Errorf("receive pages: lane %d: %w", i, err)
		}
		h, err := decodeFwdHeader(hb[:])
		if err != nil {
			return h, fmt.Errorf("lane %d: %w", i, err)
		}
		st.WireBytes += fwdHeaderLen + uint64(h.length)
		if int(h.length) > cap(payload) {
			payload = make([]byte, h.length, max(int(h.length), 64<<10))
		}
		payload = payload[:h.length] // bounded by decodeFwdHeader
		if _, err := io.ReadFull(br, payload); err != nil {
			return h, fmt.Errorf("receive pages: lane %d: %w", i, io.ErrUnexpectedEOF)
		}
		switch h.typ {
		case fwdEnd:
			g.end(i, next)
			return h, nil
		case fwdBatch:
		default:
			return h, fmt.Errorf("%w: lane %d: type %d outside a batch", ErrForward, i, h.typ)
		}
		if h.id != next {
			return h, fmt.Errorf("%w: lane %d of %d: batch %d where %d belongs", ErrForward, i, n, h.id, next)
		}
		next += uint64(n)
		data := payload
		if h.enc == encZstd {
			// The decoder refuses output beyond fwdMaxBatch.
			if decoded, err = zdec.DecodeAll(payload, decoded[:0]); err != nil {
				return h, fmt.Errorf("%w: lane %d: batch %d: %w", ErrForward, i, h.id, err)
			}
			data = decoded
			st.Compressed++
		}
		st.Batches++
		st.RawBytes += uint64(len(data))
		if err := g.enter(h.id); err != nil {
			return h, err
		}
		err = r.batch(data)
		g.leave(err)
		if err != nil {
			return h, fmt.Errorf("lane %d: batch %d: %w", i, h.id, err)
		}
	}
}

// gate lets batches apply one at a time, in number order.
type gate struct {
	mu    sync.Mutex
	cond  *sync.Cond
	lanes int
	next  uint64 // guarded by mu: the batch whose turn it is
	ended []bool // guarded by mu: lanes that sent their end frame
	endAt []uint64
	err   error // guarded by mu: the first failure
}

func newGate(lanes int) *gate {
	g := &gate{lanes: lanes, ended: make([]bool, lanes), endAt: make([]uint64, lanes)}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// enter waits for batch seq's turn. It fails when a lane failed, or when
// the lane that owes an earlier batch ended without it.
func (g *gate) enter(seq uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.next != seq && g.err == nil {
		if owner := g.next % uint64(g.lanes); g.ended[owner] && g.endAt[owner] <= g.next {
			g.err = fmt.Errorf("%w: batch %d never came: lane %d ended", ErrForward, g.next, owner)
			g.cond.Broadcast()
			break
		}
		g.cond.Wait()
	}
	return g.err
}

// leave ends the current batch's turn.
func (g *gate) leave(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.next++
	if err != nil && g.err == nil {
		g.err = err
	}
	g.cond.Broadcast()
}

// end records that lane i sent its end frame, owing no batch from next on.
func (g *gate) end(i int, next uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.ended[i], g.endAt[i] = true, next
	g.cond.Broadcast()
}

func (g *gate) fail(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.err == nil {
		g.err = err
	}
	g.cond.Broadcast()
}

func (g *gate) cause() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.err
}

// receiver applies frames to a store; the gate serialises its use.
type receiver struct {
	store  ReceiveStore
	st     ForwardStats
	opened map[pagestore.Key]bool // bounded by the store's key limit
	parent map[pagestore.Key]bool // the store has a parent image of the key
	page   []byte                 // one page, for dup checks
}

// batch applies the frames of a batch: whole frames of the kinds a batch
// may hold, nothing left over.
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
		case fwdOpen, fwdPages, fwdZero, fwdDup, fwdEntry, fwdFinal, fwdKeep:
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
	case fwdPages, fwdZero, fwdDup, fwdEntry, fwdKeep:
		if !r.opened[k] {
			return fmt.Errorf("%w: pages for %s before its open frame", ErrForward, k)
		}
	}
	var err error
	switch h.typ {
	case fwdOpen:
		var parent bool
		if parent, err = r.store.Open(k); err == nil {
			r.opened[k] = true
			r.parent[k] = parent
		}
	case fwdEntry:
		if h.flags == pagestore.FlagParent && !r.parent[k] {
			return fmt.Errorf("%w: parent pages for %s, which has no parent image", ErrForward, k)
		}
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
	case fwdFinal:
		err = r.store.BeginFinal()
	case fwdKeep:
		r.st.Kept += h.nrPages
		err = r.store.Keep(k, h.vaddr, h.nrPages)
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

package pageserver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// The fetch protocol (fetch.md): post-copy's page requests, destination to
// source, on streams of their own.

// ErrFetch marks a malformed fetch frame or preface.
var ErrFetch = errors.New("pageserver: malformed fetch frame")

// ErrRefused wraps a source's refusal of a request.
var ErrRefused = errors.New("pageserver: fetch refused by the source")

// FetchRole is what a fetch stream carries.
type FetchRole uint8

const (
	FetchFaults FetchRole = 0 // pages a thread waits for
	FetchFill   FetchRole = 1 // the background fill
)

func (r FetchRole) String() string {
	switch r {
	case FetchFaults:
		return "faults"
	case FetchFill:
		return "fill"
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

const (
	fetchVersion    = 1
	fetchHeaderSize = 32
	fetchPrefaceLen = 8
	// MaxFetchPages bounds one request (16 MiB); FetchClient splits
	// larger reads.
	MaxFetchPages = 4096
	maxRefusalLen = 1024

	fetchRequest = 1
	fetchPages   = 2
	fetchRefused = 3
)

var fetchMagic = [4]byte{'P', 'H', 'F', 'E'}

// fetchHeader is one frame's header (fetch.md).
type fetchHeader struct {
	typ   uint8
	count uint32
	id    uint64
	vaddr uint64
	seq   uint64
}

func (h fetchHeader) encode(b []byte) {
	b[0], b[1], b[2], b[3] = fetchVersion, h.typ, 0, 0
	binary.BigEndian.PutUint32(b[4:], h.count)
	binary.BigEndian.PutUint64(b[8:], h.id)
	binary.BigEndian.PutUint64(b[16:], h.vaddr)
	binary.BigEndian.PutUint64(b[24:], h.seq)
}

// decodeFetchHeader checks what every frame must satisfy; the count is
// checked against the type.
func decodeFetchHeader(b []byte) (fetchHeader, error) {
	h := fetchHeader{typ: b[1], count: binary.BigEndian.Uint32(b[4:]), id: binary.BigEndian.Uint64(b[8:]),
		vaddr: binary.BigEndian.Uint64(b[16:]), seq: binary.BigEndian.Uint64(b[24:])}
	switch {
	case b[0] != fetchVersion:
		return h, fmt.Errorf("%w: version %d", ErrFetch, b[0])
	case b[2] != 0 || b[3] != 0:
		return h, fmt.Errorf("%w: reserved bytes set", ErrFetch)
	case h.vaddr%PageSize != 0:
		return h, fmt.Errorf("%w: vaddr %#x not page aligned", ErrFetch, h.vaddr)
	}
	switch h.typ {
	case fetchRequest:
		if h.count == 0 || h.count > MaxFetchPages {
			return h, fmt.Errorf("%w: request for %d pages, want 1..%d", ErrFetch, h.count, MaxFetchPages)
		}
		if h.vaddr+uint64(h.count)*PageSize < h.vaddr {
			return h, fmt.Errorf("%w: %d pages at %#x wrap", ErrFetch, h.count, h.vaddr)
		}
	case fetchPages:
		if h.count == 0 || h.count%PageSize != 0 || h.count > MaxFetchPages*PageSize {
			return h, fmt.Errorf("%w: %d bytes of pages", ErrFetch, h.count)
		}
	case fetchRefused:
		if h.count > maxRefusalLen {
			return h, fmt.Errorf("%w: refusal of %d bytes, want ≤ %d", ErrFetch, h.count, maxRefusalLen)
		}
	default:
		return h, fmt.Errorf("%w: type %d", ErrFetch, h.typ)
	}
	return h, nil
}

// WriteFetchPreface starts a fetch stream (the source's side).
func WriteFetchPreface(w io.Writer, role FetchRole) error {
	b := [fetchPrefaceLen]byte{fetchMagic[0], fetchMagic[1], fetchMagic[2], fetchMagic[3], fetchVersion, byte(role)}
	if _, err := w.Write(b[:]); err != nil {
		return fmt.Errorf("fetch preface: %w", err)
	}
	return nil
}

// ReadFetchPreface reads and checks a fetch stream's preface.
func ReadFetchPreface(r io.Reader) (FetchRole, error) {
	var b [fetchPrefaceLen]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, fmt.Errorf("fetch preface: %w", err)
	}
	switch role := FetchRole(b[5]); {
	case [4]byte(b[:4]) != fetchMagic:
		return 0, fmt.Errorf("%w: magic %q", ErrFetch, b[:4])
	case b[4] != fetchVersion:
		return 0, fmt.Errorf("%w: version %d", ErrFetch, b[4])
	case role != FetchFaults && role != FetchFill:
		return 0, fmt.Errorf("%w: role %d", ErrFetch, b[5])
	case b[6] != 0 || b[7] != 0:
		return 0, fmt.Errorf("%w: reserved bytes set", ErrFetch)
	default:
		return role, nil
	}
}

// PageReader reads len(buf) bytes of pages of task id at vaddr. An error
// is sent to the destination as a refusal.
type PageReader func(id, vaddr uint64, buf []byte) error

// FetchServeStats counts what a fetch server answered; safe to read while
// it serves.
type FetchServeStats struct {
	Requests, Pages, Refused atomic.Uint64
}

// ServeFetch answers the requests on rw, in order, until the client closes
// it (nil) or a frame is malformed or the stream fails (an error). ctx
// ending closes nothing: the caller closes rw to stop it.
func ServeFetch(rw io.ReadWriter, read PageReader, st *FetchServeStats) error {
	hdr := make([]byte, fetchHeaderSize)
	var buf []byte
	for seq := uint64(1); ; seq++ {
		if _, err := io.ReadFull(rw, hdr); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("fetch request: %w", err)
		}
		h, err := decodeFetchHeader(hdr)
		if err == nil && (h.typ != fetchRequest || h.seq != seq) {
			err = fmt.Errorf("%w: type %d seq %d, want a request with seq %d", ErrFetch, h.typ, h.seq, seq)
		}
		if err != nil {
			return err
		}
		st.Requests.Add(1)
		n := fetchHeaderSize + int(h.count)*PageSize
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		buf = buf[:n]
		out := fetchHeader{typ: fetchPages, count: h.count * PageSize, id: h.id, vaddr: h.vaddr, seq: h.seq}
		if rerr := read(h.id, h.vaddr, buf[fetchHeaderSize:]); rerr != nil {
			msg := []byte(rerr.Error())
			if len(msg) > maxRefusalLen {
				msg = msg[:maxRefusalLen]
			}
			st.Refused.Add(1)
			out.typ, out.count = fetchRefused, uint32(len(msg))
			buf = append(buf[:fetchHeaderSize], msg...)
		} else {
			st.Pages.Add(uint64(h.count))
		}
		out.encode(buf)
		if _, err := rw.Write(buf); err != nil {
			return fmt.Errorf("fetch answer: %w", err)
		}
	}
}

// FetchClient asks a source for pages on a fetch stream. Safe for
// concurrent use; requests are pipelined. A stream that fails is lost, not
// fatal, when SetRecoverTimeout allows: requests wait (a faulting thread
// waits with them) until Attach hands over a new stream, where they are
// asked again, or the timeout fails them.
type FetchClient struct {
	wmu sync.Mutex // requests are written in seq order, one at a time

	mu         sync.Mutex
	rw         io.ReadWriteCloser // the current stream; nil while lost
	gen        uint64             // streams attached so far
	readerDone chan struct{}      // closed when the current stream's reader ends
	queue      []*fetchCall       // in flight, oldest first
	seq        uint64             // last seq sent on the current stream
	err        error              // failed for good
	grace      time.Duration      // how long a lost stream waits for Attach
	lostAt     time.Time          // when the current loss began
	lat        []time.Duration
}

// fetchCall is one request in flight; done receives its result once.
type fetchCall struct {
	h    fetchHeader
	buf  []byte
	t0   time.Time
	done chan error
}

// maxFetchLatencies bounds the latencies a client keeps (8 MiB).
const maxFetchLatencies = 1 << 20

// NewFetchClient starts reading answers from rw; Close ends it.
func NewFetchClient(rw io.ReadWriteCloser) *FetchClient {
	c := &FetchClient{}
	c.Attach(rw)
	return c
}

// NewLostFetchClient returns a client with no stream yet, as if its
// stream were just lost: requests queue until Attach hands one over, and
// fail if none comes within grace (which SetRecoverTimeout sets for later
// losses too).
func NewLostFetchClient(grace time.Duration) *FetchClient {
	c := &FetchClient{grace: grace, lostAt: time.Now()}
	time.AfterFunc(grace, func() {
		c.mu.Lock()
		still := c.gen == 0
		c.mu.Unlock()
		if still {
			c.fail(fmt.Errorf("no fetch stream within %v", grace))
		}
	})
	return c
}

// SetRecoverTimeout lets a lost stream wait d for Attach before the
// requests in flight fail (0, the default: they fail at once).
func (c *FetchClient) SetRecoverTimeout(d time.Duration) {
	c.mu.Lock()
	c.grace = d
	c.mu.Unlock()
}

// Attach makes rw the client's stream, closing the one before: the
// requests in flight are asked again on it, in order.
func (c *FetchClient) Attach(rw io.ReadWriteCloser) error {
	c.mu.Lock()
	old, oldDone := c.rw, c.readerDone
	c.rw = nil // sends queue until the requests in flight are out again
	err := c.err
	c.mu.Unlock()
	if old != nil {
		old.Close()
	}
	if oldDone != nil {
		<-oldDone // no reader writes into a call's buffer but the new one
	}
	if err != nil {
		rw.Close()
		return err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		rw.Close()
		return c.err
	}
	c.gen++
	gen, done := c.gen, make(chan struct{})
	c.rw, c.readerDone, c.seq, c.lostAt = rw, done, 0, time.Time{}
	var b []byte
	for _, call := range c.queue {
		c.seq++
		call.h.seq = c.seq
		b = append(b, make([]byte, fetchHeaderSize)...)
		call.h.encode(b[len(b)-fetchHeaderSize:])
	}
	c.mu.Unlock()
	go c.readLoop(rw, gen, done) // owned by c: Attach and Close wait
	if len(b) > 0 {
		if _, err := rw.Write(b); err != nil {
			c.lose(gen, fmt.Errorf("fetch request: %w", err))
		}
	}
	return nil
}

// Fetch fills buf (whole pages) with task id's pages from vaddr on. If ctx
// ends first it closes the client (the stream can no longer be trusted to
// be in step) and returns ctx's error; buf is not written after it
// returns.
func (c *FetchClient) Fetch(ctx context.Context, id, vaddr uint64, buf []byte) error {
	p, err := c.Start(id, vaddr, buf)
	if err != nil {
		return err
	}
	return p.Wait(ctx)
}

// Pending is a request in flight (Start).
type Pending struct {
	c     *FetchClient
	calls []*fetchCall
}

// Start asks for buf's pages (as Fetch) without waiting: several requests
// started in a row travel back to back, each answered in its turn. Wait
// collects the result; until it returns, buf belongs to the client.
func (c *FetchClient) Start(id, vaddr uint64, buf []byte) (*Pending, error) {
	if len(buf) == 0 || len(buf)%PageSize != 0 || vaddr%PageSize != 0 {
		return nil, fmt.Errorf("fetch %d bytes at %#x: not whole pages", len(buf), vaddr)
	}
	p := &Pending{c: c}
	for off := 0; off < len(buf); off += MaxFetchPages * PageSize {
		b := buf[off:min(len(buf), off+MaxFetchPages*PageSize)]
		call := &fetchCall{h: fetchHeader{typ: fetchRequest, count: uint32(len(b) / PageSize), id: id, vaddr: vaddr + uint64(off)},
			buf: b, done: make(chan error, 1)}
		if err := c.send(call); err != nil {
			c.wait(context.Background(), p.calls) // failed already: returns at once
			return nil, err
		}
		p.calls = append(p.calls, call)
	}
	return p, nil
}

// Wait returns the request's result (see Fetch for ctx).
func (p *Pending) Wait(ctx context.Context) error { return p.c.wait(ctx, p.calls) }

// wait collects calls' results; on ctx's end it closes the client, after
// which every call completes with an error.
func (c *FetchClient) wait(ctx context.Context, calls []*fetchCall) error {
	var first error
	for _, call := range calls {
		var err error
		select {
		case err = <-call.done:
		case <-ctx.Done():
			c.Close()
			<-call.done
			err = ctx.Err()
		}
		if first == nil {
			first = err
		}
	}
	return first
}

// send queues call and, unless the stream is lost, writes its request.
func (c *FetchClient) send(call *fetchCall) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	call.t0 = time.Now()
	c.queue = append(c.queue, call)
	rw, gen := c.rw, c.gen
	if rw == nil {
		c.mu.Unlock()
		return nil // Attach asks it
	}
	c.seq++
	call.h.seq = c.seq
	c.mu.Unlock()
	var b [fetchHeaderSize]byte
	call.h.encode(b[:])
	if _, err := rw.Write(b[:]); err != nil {
		// Queued: the next stream asks it again, or it fails with the
		// others.
		c.lose(gen, fmt.Errorf("fetch request: %w", err))
	}
	return nil
}

// readLoop matches the answers on rw with the oldest call in flight.
func (c *FetchClient) readLoop(rw io.ReadWriteCloser, gen uint64, done chan struct{}) {
	defer close(done)
	hdr := make([]byte, fetchHeaderSize)
	for {
		if _, err := io.ReadFull(rw, hdr); err != nil {
			c.lose(gen, fmt.Errorf("fetch answer: %w", err))
			return
		}
		if err := c.answer(rw, gen, hdr); err != nil {
			if errors.Is(err, ErrFetch) {
				c.fail(err) // a source out of step: nothing to recover
			} else {
				c.lose(gen, err)
			}
			return
		}
	}
}

// errStale: a stream was replaced while its answer was read.
var errStale = errors.New("fetch stream replaced")

// answer reads the frame whose header is hdr into the oldest call.
func (c *FetchClient) answer(rw io.Reader, gen uint64, hdr []byte) error {
	h, err := decodeFetchHeader(hdr)
	if err != nil {
		return err
	}
	c.mu.Lock()
	var call *fetchCall
	if len(c.queue) > 0 && c.gen == gen {
		call = c.queue[0]
	}
	c.mu.Unlock()
	switch {
	case call == nil:
		return fmt.Errorf("%w: answer %d with no request in flight", ErrFetch, h.seq)
	case h.typ == fetchRequest:
		return fmt.Errorf("%w: a request from the source", ErrFetch)
	case h.seq != call.h.seq || h.id != call.h.id || h.vaddr != call.h.vaddr:
		return fmt.Errorf("%w: answer %d for task %d at %#x, want %d for %d at %#x", ErrFetch,
			h.seq, h.id, h.vaddr, call.h.seq, call.h.id, call.h.vaddr)
	case h.typ == fetchPages && int(h.count) != len(call.buf):
		return fmt.Errorf("%w: %d bytes answer a request for %d", ErrFetch, h.count, len(call.buf))
	}
	var result error
	if h.typ == fetchPages {
		if _, err := io.ReadFull(rw, call.buf); err != nil {
			return fmt.Errorf("fetch pages: %w", err)
		}
	} else {
		msg := make([]byte, h.count)
		if _, err := io.ReadFull(rw, msg); err != nil {
			return fmt.Errorf("fetch refusal: %w", err)
		}
		if !utf8.Valid(msg) {
			msg = []byte(fmt.Sprintf("%q", msg))
		}
		result = fmt.Errorf("%w: %d pages of task %d at %#x: %s", ErrRefused, call.h.count, h.id, h.vaddr, msg)
	}
	c.mu.Lock()
	if c.gen != gen || len(c.queue) == 0 || c.queue[0] != call {
		// Closed or replaced meanwhile: the call has its result, or is
		// asked again.
		c.mu.Unlock()
		return errStale
	}
	c.queue = c.queue[1:]
	if len(c.lat) < maxFetchLatencies {
		c.lat = append(c.lat, time.Since(call.t0))
	}
	c.mu.Unlock()
	call.done <- result
	return nil
}

// lose handles the failure of stream gen: the calls wait for Attach up to
// the recover timeout, or fail now without one.
func (c *FetchClient) lose(gen uint64, err error) {
	c.mu.Lock()
	if c.gen != gen || c.err != nil || c.rw == nil {
		c.mu.Unlock()
		return // replaced, failed or lost already
	}
	rw, grace := c.rw, c.grace
	c.rw, c.lostAt = nil, time.Now()
	c.mu.Unlock()
	rw.Close()
	if grace <= 0 {
		c.fail(err)
		return
	}
	time.AfterFunc(grace, func() {
		c.mu.Lock()
		still := c.gen == gen && c.rw == nil
		c.mu.Unlock()
		if still {
			c.fail(fmt.Errorf("no new fetch stream within %v: %w", grace, err))
		}
	})
}

// Lost reports since when the stream is lost (zero if it is not).
func (c *FetchClient) Lost() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lostAt
}

// fail makes err final and fails every call in flight.
func (c *FetchClient) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	q, rw := c.queue, c.rw
	c.queue, c.rw = nil, nil
	c.mu.Unlock()
	if rw != nil {
		rw.Close()
	}
	for _, call := range q {
		call.done <- err
	}
}

// Latencies returns the round trips of the requests answered so far.
func (c *FetchClient) Latencies() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.lat...)
}

// Close closes the stream and waits for its reader; calls in flight fail.
func (c *FetchClient) Close() error {
	c.fail(errors.New("fetch client closed"))
	c.mu.Lock()
	done := c.readerDone
	c.mu.Unlock()
	if done != nil {
		<-done
	}
	return nil
}

package lazy

import (
	"context"
	"fmt"
)

// fill runs one step of the background fill: it takes arrived data, asks
// for more once the restore finished (or Detach), and copies one slice. It reports
// whether it did any work, so the loop polls again before blocking.
func (l *loop) fill() (busy bool, err error) {
	for more := true; more; {
		select {
		case f := <-l.bgDone:
			if err := l.arrive(f); err != nil {
				return false, err
			}
		default:
			more = false
		}
	}
	if l.filling() {
		l.request()
	}
	if len(l.arrived) == 0 {
		return false, nil
	}
	f := l.arrived[0]
	res, err := l.apply(f, copySlice)
	if err != nil {
		return false, err
	}
	switch res {
	case applyDone:
		l.arrived = l.arrived[1:]
		l.done(f)
	case applyStalled:
		l.arrived = l.arrived[1:]
		l.retry = append(l.retry, f)
	}
	return true, nil
}

// arrive queues background data for copying.
func (l *loop) arrive(f *fetch) error {
	if f.err != nil {
		return f.err
	}
	l.arrived = append(l.arrived, f)
	return nil
}

// request starts background reads until maxBackground are in flight or
// nothing is left to ask for.
func (l *loop) request() {
	for l.nbg < maxBackground {
		f := l.pick()
		if f == nil {
			return
		}
		l.inflight = append(l.inflight, f)
		l.nbg++
		l.bgReq <- f // room for maxBackground, and nbg counts them
	}
}

// pick chooses the next background read: the missing pages nearest after
// the hint (the last fault, or the end of the last read) that no read in
// flight covers, in the hint's task first, wrapping around; chunk bytes
// at most, growing by 64 KiB a read.
func (l *loop) pick() *fetch {
	order := l.tasks
	if l.hint != nil {
		order = append([]*task{l.hint}, l.tasks...)
	}
	for _, t := range order {
		if t.gone || t.pend.pages == 0 {
			continue
		}
		from := uint64(0)
		if t == l.hint {
			from = l.hintAddr
		}
		r, ok := t.pend.from(from)
		for range len(t.pend.runs) + 1 {
			if !ok {
				break
			}
			if s, e, ok := l.unrequested(t.id, r.img, r.img+(r.end-r.start)); ok {
				n := min(e-s, l.chunk)
				f := &fetch{id: t.id, img: s, buf: l.buffer(n)}
				l.hint, l.hintAddr = t, r.start+(s-r.img)+n
				l.chunk = min(l.chunk+minChunkBytes, l.maxChunk)
				return f
			}
			r, ok = t.pend.from(r.end)
		}
	}
	return nil
}

// unrequested returns the first part of the image range [lo, hi) of id
// that no read in flight covers.
func (l *loop) unrequested(id, lo, hi uint64) (s, e uint64, ok bool) {
	s = lo
	for moved := true; moved && s < hi; {
		moved = false
		for _, f := range l.inflight {
			if f.id == id && f.img <= s && s < f.end() {
				s, moved = f.end(), true
			}
		}
	}
	if s >= hi {
		return 0, 0, false
	}
	e = hi
	for _, f := range l.inflight {
		if f.id == id && f.img > s && f.img < e {
			e = f.img
		}
	}
	return s, e, true
}

// buffer returns n bytes for a background read, reusing freed buffers.
func (l *loop) buffer(n uint64) []byte {
	if k := len(l.bufs); k > 0 {
		b := l.bufs[k-1]
		l.bufs = l.bufs[:k-1]
		return b[:n]
	}
	return make([]byte, l.maxChunk)[:n]
}

// fetcher serves reads of one kind until ctx ends, handing every result
// back (errors too: the loop decides).
func fetcher(ctx context.Context, src Source, req <-chan *fetch, done chan<- *fetch) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case f := <-req:
			if err := src.ReadPages(ctx, f.id, f.img, f.buf); err != nil {
				f.err = fmt.Errorf("lazy: read %d pages of task %d at %#x: %w", len(f.buf)/pageSize, f.id, f.img, err)
			}
			select {
			case done <- f:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

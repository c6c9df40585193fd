package lazy

import (
	"fmt"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// serve drains t's events after its waiter's notice, then lets the waiter
// wait again.
func (l *loop) serve(t *task) error {
	err := l.drain(t)
	if !t.stopped {
		t.rearm <- struct{}{} // room for one: the waiter takes it before its next notice
	}
	if err != nil {
		return err
	}
	return l.retryAll()
}

// drain reads and handles every event pending on t.
func (l *loop) drain(t *task) error {
	var evs [linux.MaxUffdEvents]linux.UffdEvent
	for !t.gone {
		n, err := t.uffd.ReadEvents(evs[:])
		now := time.Now()
		var herr error
		for i := range n { // every one: a FORK's child fd must be taken
			if e := l.event(t, &evs[i], now); herr == nil {
				herr = e
			}
		}
		if err != nil {
			return fmt.Errorf("lazy: task %s: %w", t.label, err)
		}
		if herr != nil || n < len(evs) {
			return herr
		}
	}
	return nil
}

func (l *loop) event(t *task, ev *linux.UffdEvent, now time.Time) error {
	switch ev.Kind {
	case linux.UffdEventPagefault:
		return l.fault(t, ev.Address&^(pageSize-1), now)
	case linux.UffdEventFork:
		t.forks++
		c := newTask(fmt.Sprintf("%s/fork%d", t.label, t.forks), t.id, ev.Child, t.pend.clone())
		l.add(c, false)
	case linux.UffdEventRemap:
		// Threads waiting on the old pages fault again where they are now.
		l.wakeWaiting(t, ev.From, ev.From+ev.Len)
		l.skip(t, ev.To, ev.To+ev.Len)
		t.pend.move(ev.From, ev.To, ev.Len)
	case linux.UffdEventRemove, linux.UffdEventUnmap:
		// Gone or zero now: never copy old data there.
		l.skip(t, ev.Start, ev.End)
	default:
		return fmt.Errorf("lazy: task %s: unexpected userfaultfd event %v", t.label, ev.Kind)
	}
	return nil
}

// fault handles a thread's fault at the page addr of t.
func (l *loop) fault(t *task, addr uint64, now time.Time) error {
	l.hint, l.hintAddr, l.chunk = t, addr, minChunkBytes
	r, ok := t.pend.find(addr)
	if !ok {
		return l.zero(t, addr)
	}
	if _, dup := t.waiting[addr]; dup {
		return nil // another thread faulted on it first
	}
	t.waiting[addr] = now
	img := r.img + (addr - r.start)
	for _, f := range l.inflight {
		if f.fault && f.id == t.id && f.img <= img && img < f.end() {
			return nil // a sibling's fault reads it already
		}
	}
	f := &fetch{id: t.id, img: img, buf: make([]byte, pageSize), fault: true}
	l.inflight = append(l.inflight, f)
	l.faultQ = append(l.faultQ, f)
	l.flushFaults()
	return nil
}

// flushFaults hands queued fault reads to the fetchers as room allows.
func (l *loop) flushFaults() {
	for len(l.faultQ) > 0 {
		select {
		case l.faultReq <- l.faultQ[0]:
			l.faultQ = l.faultQ[1:]
		default:
			return
		}
	}
}

// delivered copies the data of a fault read.
func (l *loop) delivered(f *fetch) error {
	if f.err != nil {
		return f.err
	}
	res, err := l.apply(f, ^uint64(0))
	if err != nil || res == applyStalled {
		if res == applyStalled {
			l.retry = append(l.retry, f)
		}
		return err
	}
	l.done(f)
	return nil
}

// done forgets an applied fetch.
func (l *loop) done(f *fetch) {
	for i, g := range l.inflight {
		if g == f {
			l.inflight = append(l.inflight[:i], l.inflight[i+1:]...)
			break
		}
	}
	if !f.fault {
		l.nbg--
		l.bufs = append(l.bufs, f.buf[:cap(f.buf)])
	}
}

// retryAll applies again what met EAGAIN.
func (l *loop) retryAll() error {
	fs, zs := l.retry, l.zeros
	l.retry, l.zeros = nil, nil
	for i, f := range fs {
		res, err := l.apply(f, ^uint64(0))
		if err != nil {
			l.retry = append(l.retry, fs[i:]...)
			return err
		}
		if res == applyStalled {
			l.retry = append(l.retry, f)
			continue
		}
		l.done(f)
	}
	for _, z := range zs {
		if err := l.zero(z.t, z.addr); err != nil {
			return err
		}
	}
	return nil
}

package lazy

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/linux"
)

type applyResult uint8

const (
	applyDone    applyResult = iota // nothing of it is missing any more
	applyMore                       // the byte budget ran out first
	applyStalled                    // EAGAIN: read the task's events, then retry
)

// apply copies f's data into every task whose missing pages it holds (the
// task it was read for, and children forked since), at most limit bytes.
// It copies only what is still missing: pages dropped by an event since
// the read, or copied by another fetch, are left alone.
func (l *loop) apply(f *fetch, limit uint64) (applyResult, error) {
	lo, hi := f.img, f.end()
	for _, t := range l.tasks {
		if t.id != f.id {
			continue
		}
		for !t.gone {
			p, ok := t.pend.mapped(lo, hi)
			if !ok {
				break
			}
			if limit == 0 {
				return applyMore, nil
			}
			n := min(p.end-p.start, limit)
			stalled, err := l.copy(t, p.start, f.buf[p.img-lo:][:n], f.fault)
			if err != nil {
				return 0, err
			}
			if stalled {
				return applyStalled, nil
			}
			limit -= n
		}
	}
	return applyDone, nil
}

// copy places data at dst in t (UFFDIO_COPY, waking the threads waiting
// there) and accounts for what happened; every call without stalled or
// an error removes at least one page from t.pend, or drops t.
func (l *loop) copy(t *task, dst uint64, data []byte, fault bool) (stalled bool, err error) {
	n, err := t.uffd.Copy(dst, data)
	if n > 0 {
		l.placed(t, dst, dst+uint64(n), fault)
	}
	rest := dst + uint64(n)
	switch {
	case err == nil:
	case errors.Is(err, syscall.EAGAIN):
		// After a partial copy the next call meets the real cause;
		// with nothing copied the mm is changing: an event is due.
		return n == 0, nil
	case errors.Is(err, syscall.EEXIST):
		l.skip(t, rest, rest+pageSize) // present already: keep it
	case errors.Is(err, syscall.ENOENT):
		// No registered VMA holds [rest, end): one that VMAs split
		// since the images were written (mprotect) takes page-sized
		// copies; a page no VMA holds is dropped.
		if uint64(len(data)-n) > pageSize {
			return l.copy(t, rest, data[n:n+pageSize], fault)
		}
		l.log.Debug("no vma for a lazy page", "pid", t.label, "addr", rest)
		l.skip(t, rest, rest+pageSize)
	case errors.Is(err, syscall.ESRCH), errors.Is(err, syscall.ENOSPC):
		l.exited(t)
	default:
		return false, fmt.Errorf("lazy: task %s: %w", t.label, err)
	}
	return false, nil
}

// placed accounts for pages copied into [s, e) of t.
func (l *loop) placed(t *task, s, e uint64, fault bool) {
	pages := t.pend.cut(s, e)
	now := time.Now()
	var lat []time.Duration
	var origin []int
	remoter, _ := l.d.cfg.Source.(Remoter)
	for addr, at := range t.waiting {
		if s <= addr && addr < e {
			lat = append(lat, now.Sub(at))
			o := -1
			if remoter != nil {
				o = 0
				if remoter.Remote(t.id, addr) {
					o = 1
				}
			}
			origin = append(origin, o)
			delete(t.waiting, addr)
		}
	}
	l.d.account(func(st *stats) {
		if fault {
			st.s.FaultPages += pages
		} else {
			st.s.PushedPages += pages
		}
		st.lastAt = now
		for i, d := range lat {
			st.fault(d, origin[i])
		}
	})
}

// skip drops [s, e) from t's missing pages without copying; threads
// waiting there fault again and find the page present, zero or gone.
func (l *loop) skip(t *task, s, e uint64) {
	if n := t.pend.cut(s, e); n > 0 {
		l.d.account(func(st *stats) { st.s.SkippedPages += n })
	}
	l.wakeWaiting(t, s, e)
}

// wakeWaiting wakes the threads waiting on faults in [s, e) of t
// (UFFDIO_WAKE) and forgets their faults: each faults again.
func (l *loop) wakeWaiting(t *task, s, e uint64) {
	for addr := range t.waiting {
		if s <= addr && addr < e {
			delete(t.waiting, addr)
			if err := t.uffd.Wake(linux.UffdRange{Start: addr, Len: pageSize}); err != nil {
				l.log.Debug("wake", "pid", t.label, "addr", addr, "err", err)
			}
		}
	}
}

// zero answers a fault outside the lazy ranges with the zero page.
func (l *loop) zero(t *task, addr uint64) error {
	r := linux.UffdRange{Start: addr, Len: pageSize}
	_, err := t.uffd.Zeropage(r)
	switch {
	case err == nil:
		l.d.account(func(st *stats) { st.s.ZeroPages++ })
	case errors.Is(err, syscall.EAGAIN):
		l.zeros = append(l.zeros, zeroReq{t, addr})
	case errors.Is(err, syscall.EEXIST), errors.Is(err, syscall.ENOENT):
		// Present, or no longer registered: the thread faults again
		// and the kernel resolves it.
		if err := t.uffd.Wake(r); err != nil {
			l.log.Debug("wake", "pid", t.label, "addr", addr, "err", err)
		}
	case errors.Is(err, syscall.ESRCH), errors.Is(err, syscall.ENOSPC):
		l.exited(t)
	default:
		return fmt.Errorf("lazy: task %s: %w", t.label, err)
	}
	return nil
}

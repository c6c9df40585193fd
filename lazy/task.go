package lazy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// task is one userfaultfd the daemon serves: a restored task, or a child a
// restored task forked. Its fields are the loop's while Serve runs.
type task struct {
	label string      // the vpid, or <vpid>/fork<n> for a forked child
	id    uint64      // the image id its pages come from: a child's parent's
	uffd  *linux.Uffd // closed by Serve (on success, or once gone) or Close
	pend  segs        // lazy pages still missing
	// waiting maps faulted pages being fetched to when the fault was read.
	waiting map[uint64]time.Time
	forks   int  // children forked so far, for their labels
	gone    bool // its mm exited (ESRCH/ENOSPC): nothing more to copy

	rearm   chan struct{} // loop -> waiter: events drained, wait again
	stop    chan struct{} // closed when the waiter must end
	stopped bool
}

func newTask(label string, id uint64, uffd *linux.Uffd, pend segs) *task {
	return &task{
		label: label, id: id, uffd: uffd, pend: pend,
		waiting: make(map[uint64]time.Time),
		rearm:   make(chan struct{}, 1),
		stop:    make(chan struct{}),
	}
}

// wait tells the loop whenever t has events, one notice at a time: after
// each it waits for the loop to drain t. It reads no event itself, so an
// event is read only by the loop, in order with its copies. It returns nil
// once stopped (stopWaiter) or when ctx ends.
func (l *loop) wait(ctx context.Context, t *task) error {
	for {
		if err := t.uffd.WaitReadable(); err != nil {
			select {
			case <-t.stop:
				return nil
			case <-ctx.Done():
				return nil
			default:
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			return fmt.Errorf("lazy: task %s: wait for events: %w", t.label, err)
		}
		select {
		case l.ready <- t:
		case <-t.stop:
			return nil
		case <-ctx.Done():
			return nil
		}
		select {
		case <-t.rearm:
		case <-t.stop:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

// stopWaiter ends t's waiter: the deadline releases a WaitReadable.
func (l *loop) stopWaiter(t *task) {
	if t.stopped {
		return
	}
	t.stopped = true
	close(t.stop)
	t.uffd.File().SetReadDeadline(time.Unix(1, 0))
}

// add starts serving t.
func (l *loop) add(t *task, lazy bool) {
	l.tasks = append(l.tasks, t)
	l.d.account(func(st *stats) {
		st.s.Tasks++
		if lazy {
			st.s.LazyPages += t.pend.pages
		}
	})
	l.log.Info("task", "pid", t.label, "lazy_pages", t.pend.pages)
	l.spawn(func() error { return l.wait(l.ctx, t) })
}

// exited drops t: its mm is gone.
func (l *loop) exited(t *task) {
	if t.gone {
		return
	}
	t.gone = true
	n := t.pend.pages
	t.pend = segs{}
	clear(t.waiting)
	l.stopWaiter(t)
	l.d.account(func(st *stats) { st.s.SkippedPages += n })
	l.log.Info("task exited", "pid", t.label, "missing_pages", n)
}

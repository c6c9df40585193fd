package lazy

import (
	"context"
	"log/slog"
	"time"
)

const (
	// copySlice bounds one UFFDIO_COPY of background data, so faults
	// wait for at most one slice (about 0.6 ms at this VM's first-touch
	// rate of ~0.4 GB/s).
	copySlice = 256 << 10
	// maxBackground bounds background reads in flight or waiting to be
	// copied, bgFetchers the reads in flight: a Source far away (a fetch
	// from the source host, ~1 ms a round trip, more after a fault cut the
	// chunks back to 64 KiB) needs several in flight to fill at its link's
	// rate, and one is copied meanwhile.
	maxBackground = 4
	bgFetchers    = 3
	// retryDelay is how long a copy that met EAGAIN (the task's mm is
	// changing) waits if no event wakes the loop first.
	retryDelay = time.Millisecond
)

// fetch is one Source read: len(buf) bytes of image id from img on.
type fetch struct {
	id    uint64
	img   uint64
	buf   []byte
	fault bool  // read for a fault (else background)
	err   error // from the Source
}

func (f *fetch) end() uint64 { return f.img + uint64(len(f.buf)) }

// loop owns every task's state and is the only reader of their events and
// the only caller of UFFDIO_COPY/ZEROPAGE. Its fields are its own.
type loop struct {
	d     *Daemon
	log   *slog.Logger
	ctx   context.Context    // run's, for the waiters it spawns
	spawn func(func() error) // starts a goroutine owned by Serve
	ctrl  <-chan ctrl        // control -> loop
	detC  <-chan int         // Detach -> loop: the tasks the restore announces
	ready chan *task         // waiters -> loop: events pending
	tasks []*task

	faultReq, bgReq   chan *fetch // loop -> fetchers
	faultDone, bgDone chan *fetch // fetchers -> loop

	inflight []*fetch  // sent to a fetcher and not yet applied
	faultQ   []*fetch  // fault reads waiting for room in faultReq
	arrived  []*fetch  // background data to copy; arrived[0] is being copied
	retry    []*fetch  // data a copy left with EAGAIN
	zeros    []zeroReq // zero pages left with EAGAIN
	nbg      int       // background fetches in inflight
	bufs     [][]byte  // free background buffers

	finished bool   // the restore sent its finish marker
	records  int    // task and zombie records read
	detached bool   // Detach: fill now, done once want records came
	want     int    // with detached
	chunk    uint64 // the next background read's size
	maxChunk uint64
	hint     *task  // where the fill goes on: the task of the last fault,
	hintAddr uint64 // at its address, then past the last chunk
}

type zeroReq struct {
	t    *task
	addr uint64
}

func newLoop(d *Daemon) *loop {
	return &loop{
		d:         d,
		log:       d.log,
		ready:     make(chan *task),
		faultReq:  make(chan *fetch, 64),
		faultDone: make(chan *fetch, 64),
		bgReq:     make(chan *fetch, maxBackground),
		bgDone:    make(chan *fetch, maxBackground),
		chunk:     minChunkBytes,
		maxChunk:  uint64(d.cfg.MaxChunkBytes),
	}
}

// run serves until every lazy page is in place (nil), ctx ends or an
// error. Faults and events come first; between them the background fill
// copies one slice at a time.
func (l *loop) run(ctx context.Context) (err error) {
	l.ctx = ctx
	defer func() {
		for _, t := range l.tasks {
			l.stopWaiter(t)
			if err != nil && t.pend.pages > 0 {
				l.log.Warn("lazy pages missing", "pid", t.label, "pages", t.pend.pages,
					"runs", len(t.pend.runs), "faults_waiting", len(t.waiting))
			}
		}
		if err != nil {
			l.log.Warn("serve ends", "finished", l.finished, "inflight", len(l.inflight),
				"queued_faults", len(l.faultQ), "arrived", len(l.arrived), "retries", len(l.retry)+len(l.zeros), "err", err)
		}
	}()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := l.poll(); err != nil {
			return err
		}
		if l.complete() {
			return nil
		}
		busy, ferr := l.fill()
		if err = ferr; err != nil {
			return err
		}
		if busy {
			continue
		}
		var retryC <-chan time.Time
		if len(l.retry)+len(l.zeros) > 0 {
			timer.Reset(retryDelay)
			retryC = timer.C
		}
		select {
		case <-ctx.Done():
		case m := <-l.ctrl:
			err = l.control(m)
		case n := <-l.detC:
			l.detach(n)
		case t := <-l.ready:
			err = l.serve(t)
		case f := <-l.faultDone:
			err = l.delivered(f)
		case f := <-l.bgDone:
			err = l.arrive(f)
		case <-retryC:
			err = l.retryAll()
		}
		timer.Stop()
		if err != nil {
			return err
		}
	}
}

// poll handles whatever of the control messages, events and fault data is
// ready, without blocking.
func (l *loop) poll() error {
	for {
		var err error
		select {
		case m := <-l.ctrl:
			err = l.control(m)
		case n := <-l.detC:
			l.detach(n)
		case t := <-l.ready:
			err = l.serve(t)
		case f := <-l.faultDone:
			err = l.delivered(f)
		default:
			l.flushFaults()
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func (l *loop) control(m ctrl) error {
	switch {
	case m.finish:
		l.finished = true
		l.startFill()
		l.log.Info("restore finished", "tasks", len(l.tasks))
	case m.zombie:
		l.records++
	default:
		l.records++
		l.add(m.task, true)
	}
	return nil
}

// detach starts the background fill without the finish marker, and
// lets Serve end once want task records came and no page is missing.
func (l *loop) detach(want int) {
	l.detached, l.want = true, want
	l.startFill()
	l.log.Info("detaching: filling every lazy page now", "tasks", want, "records", l.records)
}

// startFill records when the background fill started, once.
func (l *loop) startFill() {
	l.d.account(func(st *stats) {
		if st.finishAt.IsZero() {
			st.finishAt = time.Now()
		}
	})
}

// filling reports whether the background fill runs: after the finish
// marker, or once detached.
func (l *loop) filling() bool { return l.finished || l.detached }

// complete reports whether every lazy page is in place (or no longer
// wanted) and nothing is in flight, after the finish marker or, detached,
// once every task the restore announces has come.
func (l *loop) complete() bool {
	if !l.finished && !(l.detached && l.records >= l.want) {
		return false
	}
	if len(l.inflight)+len(l.faultQ)+len(l.retry)+len(l.zeros) > 0 {
		return false
	}
	for _, t := range l.tasks {
		if t.pend.pages > 0 {
			return false
		}
	}
	return true
}

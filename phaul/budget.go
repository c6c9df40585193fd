package phaul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// The service's shared budgets: the memory all migrations' prefaults hold
// at once, and the disk all migrations' directories fill.

// memBudget is the memory the prefaults of all migrations may hold.
type memBudget struct {
	mu    sync.Mutex
	limit uint64 // 0: half of what is available (counting what is held)
	held  uint64
}

// take grants up to want bytes (whole MiB; 0 if there is no room).
func (b *memBudget) take(want uint64) uint64 {
	avail, err := linux.MemAvailable()
	if err != nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	limit := b.limit
	if limit == 0 {
		limit = (avail + b.held) / 2
	}
	var room uint64
	if limit > b.held {
		room = limit - b.held
	}
	n := min(want, room, avail/2) &^ (1<<20 - 1)
	b.held += n
	return n
}

func (b *memBudget) give(n uint64) {
	b.mu.Lock()
	b.held -= n
	b.mu.Unlock()
}

// prefaulted is memory a prefault filled for a restore, counted in the
// budget until released.
type prefaulted struct {
	r    *linux.Reserve
	n    uint64
	b    *memBudget
	once sync.Once
}

// Release frees the memory and returns it to the budget; a nil one is
// released.
func (p *prefaulted) Release() {
	if p == nil {
		return
	}
	p.once.Do(func() {
		p.r.Release()
		p.b.give(p.n)
	})
}

// prefault fills up to n bytes of fresh memory for the restore, as much
// as the shared budget grants.
func (s *Server) prefault(log *slog.Logger, n uint64) *prefaulted {
	got := s.mem.take(n)
	if got == 0 {
		log.Info("prefault: no room in the memory budget", "asked_mib", n>>20)
		return nil
	}
	r, d, err := linux.Prefault(int(got))
	if err != nil {
		s.mem.give(got)
		log.Warn("prefault", "err", err)
		return nil
	}
	log.Info("prefaulted memory for the restore", "mib", got>>20, "asked_mib", n>>20, "dur", d)
	return &prefaulted{r: r, n: got, b: &s.mem}
}

// errDiskBudget: the migrations' directories would fill the disk past
// what the service may use.
var errDiskBudget = errors.New("destination disk budget exhausted")

// checkDisk reports whether the work dir's filesystem keeps MinFreeDisk
// free and the migrations' directories stay within DiskBudget.
func (s *Server) checkDisk() error {
	free, err := linux.DiskFree(s.cfg.WorkDir)
	if err != nil {
		return err
	}
	if free < s.cfg.MinFreeDisk {
		return fmt.Errorf("%w: %d MiB free in %s, below --min-free-disk %d MiB", errDiskBudget, free>>20, s.cfg.WorkDir, s.cfg.MinFreeDisk>>20)
	}
	if s.cfg.DiskBudget == 0 {
		return nil
	}
	s.mu.Lock()
	ins := make([]*incoming, 0, len(s.active))
	for _, in := range s.active {
		ins = append(ins, in)
	}
	s.mu.Unlock()
	var used uint64
	for _, in := range ins {
		if in.dir != "" {
			n, err := linux.DiskUsage(in.dir)
			if err != nil {
				return err
			}
			used += n
		}
		if st := in.store.Load(); st != nil {
			used += st.Stats().SpoolBytes // unnamed files the walk misses
		}
	}
	if used > s.cfg.DiskBudget {
		return fmt.Errorf("%w: migrations hold %d MiB, over --disk-budget %d MiB", errDiskBudget, used>>20, s.cfg.DiskBudget>>20)
	}
	return nil
}

// watchDisk checks the disk every interval while ctx lasts and calls
// stop with the first problem.
func (s *Server) watchDisk(ctx context.Context, interval time.Duration, stop func(error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.checkDisk(); err != nil {
				stop(err)
				return
			}
		}
	}
}

package main

import (
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/phaul/phaul/phaul"
)

// progressBar draws one status line on a terminal: phase, bytes, rate.
type progressBar struct {
	mu    sync.Mutex
	out   *os.File
	phase phaul.Phase
	round int
	since time.Time
	last  time.Time
}

// newProgressBar returns nil when out is not a terminal: logs then carry
// the progress.
func newProgressBar(out *os.File) *progressBar {
	st, err := out.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	return &progressBar{out: out, since: time.Now()}
}

func (p *progressBar) update(e phaul.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e.Phase != p.phase || e.Round != p.round {
		p.phase, p.round, p.since = e.Phase, e.Round, time.Now()
	} else if time.Since(p.last) < 100*time.Millisecond {
		return
	}
	p.last = time.Now()
	line := fmt.Sprintf("%-9s %6.1fs", e.Phase, e.Elapsed.Seconds())
	if e.Round > 0 {
		// Pre-copy, as QEMU's query-migrate: round, remaining, rate,
		// expected downtime.
		line += fmt.Sprintf("  round %d", e.Round)
	}
	if e.Bytes > 0 {
		rate := float64(e.Bytes) / time.Since(p.since).Seconds() / (1 << 20)
		line += fmt.Sprintf("  %8.1f MiB  %7.1f MiB/s", float64(e.Bytes)/(1<<20), rate)
	}
	if e.Phase == phaul.PhasePostcopy {
		// The destination runs the tree: what it still lacks.
		line += fmt.Sprintf("  at the source %.1f MiB", float64(e.Remaining)/(1<<20))
	}
	if e.Round > 0 {
		line += fmt.Sprintf("  remaining %.1f MiB", float64(e.Remaining)/(1<<20))
		if e.ExpectedDowntime > 0 {
			line += fmt.Sprintf("  expected downtime %v", e.ExpectedDowntime.Round(time.Millisecond))
		}
	}
	fmt.Fprintf(p.out, "\r\033[K%s", line)
}

func (p *progressBar) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprint(p.out, "\r\033[K")
}

package testenv

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// state reads and parses the whole log: every copy appends to it.
func (w *Workload) state() (logState, error) {
	data, err := os.ReadFile(w.Log)
	if errors.Is(err, os.ErrNotExist) {
		return logState{}, nil // not started yet
	}
	if err != nil {
		return logState{}, err
	}
	return parseLog(data)
}

// Steps returns every step line logged so far, by all copies, in log order.
func (w *Workload) Steps() ([]Step, error) {
	st, err := w.state()
	return st.steps, err
}

// LastStep returns the last step logged, or ErrNoSteps.
func (w *Workload) LastStep() (Step, error) {
	st, err := w.state()
	if err != nil {
		return Step{}, err
	}
	if len(st.steps) == 0 {
		return Step{}, ErrNoSteps
	}
	return st.steps[len(st.steps)-1], nil
}

// Lines returns the complete lines of the log that start with prefix, such
// as "ok tcp" or "CORRUPT".
func (w *Workload) Lines(prefix string) ([]string, error) {
	st, err := w.state()
	var out []string
	for _, l := range st.lines {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out, err
}

// Health returns nil if the log so far is healthy, else an error wrapping
// ErrUnhealthy: a CORRUPT or FAIL line, a step that is not one more than the
// one before (went back, repeated or skipped), or a verification count that
// went back. A malformed log is an error too.
func (w *Workload) Health() error {
	st, err := w.state()
	if err != nil {
		return err
	}
	return st.health()
}

// CheckHealthy fails the test unless Health is nil.
func (w *Workload) CheckHealthy(tb testing.TB) {
	tb.Helper()
	if err := w.Health(); err != nil {
		tb.Fatalf("workload %s: %v\n%s", w.Log, err, w.tail())
	}
}

// WaitProgress waits until n more steps than the last one logged now are
// logged. It fails the test at once if the log turns unhealthy.
func (w *Workload) WaitProgress(tb testing.TB, n int) {
	tb.Helper()
	from, err := w.LastStep()
	if err != nil && !errors.Is(err, ErrNoSteps) {
		tb.Fatalf("workload log: %v", err)
	}
	timeout := 30*time.Second + 4*time.Duration(n)*stepPeriod
	last := from.N
	ok, err := poll(timeout, func() (bool, error) {
		st, err := w.state()
		if err == nil {
			err = st.health()
		}
		if len(st.steps) > 0 {
			last = st.steps[len(st.steps)-1].N
		}
		return last >= from.N+uint64(n), err
	})
	if err != nil || !ok {
		tb.Fatalf("workload: %d steps from %d wanted, at %d after %v (running: %v): %v\n%s",
			n, from.N, last, timeout, Running(tb, w.Log), err, w.tail())
	}
}

// Region returns the address and page count of the workload's verified
// memory, from the start line of its log.
func (w *Workload) Region() (addr uint64, pages int, err error) {
	st, err := w.state()
	if err != nil {
		return 0, 0, err
	}
	return st.region()
}

// CorruptPage flips bits in one word of page, through /proc/PID/mem of the
// one running copy, without telling its ledger: the next verification must
// log CORRUPT and exit 3. A writer that rewrites the page first hides it, so
// use PagesPerSec < 0 for a certain result.
func (w *Workload) CorruptPage(page int) (err error) {
	addr, pages, err := w.Region()
	if err != nil {
		return err
	}
	if page < 0 || page >= pages {
		return fmt.Errorf("corrupt page %d: workload has %d", page, pages)
	}
	pids, err := running(w.Log)
	if err != nil {
		return err
	}
	if len(pids) != 1 {
		return fmt.Errorf("corrupt page: %d copies run: %v", len(pids), pids)
	}
	f, err := os.OpenFile(fmt.Sprintf("/proc/%d/mem", pids[0]), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	off := int64(addr) + int64(page)*4096 + 512 // word 64: pattern, not header
	var word [8]byte
	if _, err := f.ReadAt(word[:], off); err != nil {
		return fmt.Errorf("read page %d: %w", page, err)
	}
	word[0] ^= 0xff
	if _, err := f.WriteAt(word[:], off); err != nil {
		return fmt.Errorf("write page %d: %w", page, err)
	}
	return nil
}

// LongestStall returns the longest gap between two consecutive steps the
// workload logged (every copy, in log order): the stall it saw.
func (w *Workload) LongestStall() (time.Duration, error) {
	st, err := w.state()
	return st.longestStall(), err
}

// TickGaps returns every gap of the workload's ticker thread logged so far
// (every copy, in log order): per step, the longest gap between its 1 ms
// wakeups since the step before, if over 5 ms (see TickGap).
func (w *Workload) TickGaps() ([]TickGap, error) {
	st, err := w.state()
	return st.ticks, err
}

// LongestTickGap returns the longest gap of the workload's ticker thread
// that ended after since, such as a mark taken before a migration: the
// longest time the process could not run from then on (a thread needing
// only the CPU and its own page was not woken), measured apart from its
// steps. A gap that spans a freeze ends only when the restored copy
// runs again, so wait for its progress first (WaitProgress). Zero means no
// gap over 5 ms; a gap under way is not logged yet.
func (w *Workload) LongestTickGap(since time.Time) (time.Duration, error) {
	st, err := w.state()
	return st.longestTickGap(since).Gap, err
}

package testenv

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Step is one "step=S t=NS pid=P verified=V" line of a workload log.
type Step struct {
	N        uint64    // step counter, kept in the workload's memory
	Time     time.Time // CLOCK_REALTIME of the logging host
	PID      int       // getpid() in the workload's PID namespace (1 under StartWorkload)
	Verified uint64    // full memory verifications finished so far
}

// TickGap is one "tick gap=G t=NS" line of a workload log: the longest gap
// between two wakeups of the workload's ticker thread, which sleeps 1 ms at
// a time, in the window since the step before (one line per step at most,
// only gaps over 5 ms). The ticker touches no memory but its own page and
// stack, so Gap is a time the process could not run, whatever its steps do:
// a freeze, a restore, faults on those pages, the scheduler.
type TickGap struct {
	Gap time.Duration // CLOCK_MONOTONIC between the two wakeups
	End time.Time     // CLOCK_REALTIME of the logging host at the second
}

// tickReport is the shortest gap the workload logs (TICK_REPORT_NS).
const tickReport = 5 * time.Millisecond

// ErrUnhealthy is wrapped by every health error: the workload reported a
// CORRUPT or FAIL line, or its steps or verification count went wrong.
var ErrUnhealthy = errors.New("workload unhealthy")

var errMalformed = errors.New("malformed workload log line")

// logState is a parsed workload log. A last line without its newline (a
// write under way) is left out.
type logState struct {
	lines []string // every complete line
	steps []Step
	ticks []TickGap
	bad   []string // CORRUPT and FAIL lines
}

func parseLog(data []byte) (logState, error) {
	var st logState
	text := string(data)
	if i := strings.LastIndexByte(text, '\n'); i >= 0 {
		text = text[:i]
	} else {
		text = ""
	}
	if text == "" {
		return st, nil
	}
	st.lines = strings.Split(text, "\n")
	for i, line := range st.lines {
		switch {
		case strings.HasPrefix(line, "step="):
			s, err := parseStep(line)
			if err != nil {
				return st, fmt.Errorf("line %d: %w", i+1, err)
			}
			st.steps = append(st.steps, s)
		case strings.HasPrefix(line, "tick "):
			g, err := parseTick(line)
			if err != nil {
				return st, fmt.Errorf("line %d: %w", i+1, err)
			}
			st.ticks = append(st.ticks, g)
		case strings.HasPrefix(line, "CORRUPT"), strings.HasPrefix(line, "FAIL"):
			st.bad = append(st.bad, line)
		}
	}
	return st, nil
}

// parseStep parses exactly "step=S t=NS pid=P verified=V".
func parseStep(line string) (Step, error) {
	f := strings.Split(line, " ")
	keys := [...]string{"step=", "t=", "pid=", "verified="}
	if len(f) != len(keys) {
		return Step{}, fmt.Errorf("%w: %q", errMalformed, line)
	}
	var v [len(keys)]uint64
	for i, k := range keys {
		num, ok := strings.CutPrefix(f[i], k)
		n, err := strconv.ParseUint(num, 10, 64)
		if !ok || err != nil {
			return Step{}, fmt.Errorf("%w: %q", errMalformed, line)
		}
		v[i] = n
	}
	if v[1] > 1<<63-1 || v[2] > 1<<31-1 {
		return Step{}, fmt.Errorf("%w: %q", errMalformed, line)
	}
	return Step{N: v[0], Time: time.Unix(0, int64(v[1])), PID: int(v[2]), Verified: v[3]}, nil
}

// parseTick parses exactly "tick gap=G t=NS", G and NS below 2^63.
func parseTick(line string) (TickGap, error) {
	f := strings.Split(line, " ")
	keys := [...]string{"gap=", "t="}
	if len(f) != 1+len(keys) || f[0] != "tick" {
		return TickGap{}, fmt.Errorf("%w: %q", errMalformed, line)
	}
	var v [len(keys)]int64
	for i, k := range keys {
		num, ok := strings.CutPrefix(f[1+i], k)
		n, err := strconv.ParseUint(num, 10, 63)
		if !ok || err != nil {
			return TickGap{}, fmt.Errorf("%w: %q", errMalformed, line)
		}
		v[i] = int64(n)
	}
	return TickGap{Gap: time.Duration(v[0]), End: time.Unix(0, v[1])}, nil
}

// formatTick is the workload's format, for tests.
func formatTick(g TickGap) string {
	return fmt.Sprintf("tick gap=%d t=%d", int64(g.Gap), g.End.UnixNano())
}

// formatStep is the workload's format, for tests.
func formatStep(s Step) string {
	return fmt.Sprintf("step=%d t=%d pid=%d verified=%d", s.N, s.Time.UnixNano(), s.PID, s.Verified)
}

// health checks a log: no CORRUPT or FAIL line, every step one more than the
// one before (a step that goes back or repeats means an old or second copy
// ran; one skipped means a lost line), verification count never going back.
func (st logState) health() error {
	if len(st.bad) > 0 {
		return fmt.Errorf("%w: %s", ErrUnhealthy, st.bad[0])
	}
	for i := 1; i < len(st.steps); i++ {
		prev, cur := st.steps[i-1], st.steps[i]
		switch {
		case cur.N <= prev.N:
			return fmt.Errorf("%w: step went back from %d to %d", ErrUnhealthy, prev.N, cur.N)
		case cur.N != prev.N+1:
			return fmt.Errorf("%w: steps %d to %d missing", ErrUnhealthy, prev.N+1, cur.N-1)
		case cur.Verified < prev.Verified:
			return fmt.Errorf("%w: verified went back from %d to %d at step %d",
				ErrUnhealthy, prev.Verified, cur.Verified, cur.N)
		}
	}
	return nil
}

// region returns the start address and page count from the "start" line.
func (st logState) region() (addr uint64, pages int, err error) {
	for _, line := range st.lines {
		if !strings.HasPrefix(line, "start ") {
			continue
		}
		for _, f := range strings.Fields(line) {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "region":
				addr, err = strconv.ParseUint(strings.TrimPrefix(v, "0x"), 16, 64)
			case "pages":
				pages, err = strconv.Atoi(v)
			}
			if err != nil {
				return 0, 0, fmt.Errorf("%w: %q", errMalformed, line)
			}
		}
		if addr == 0 || pages <= 0 {
			return 0, 0, fmt.Errorf("%w: %q", errMalformed, line)
		}
		return addr, pages, nil
	}
	return 0, 0, errors.New("no start line in workload log")
}

// longestStall returns the longest time between two consecutive steps: the
// workload logs one every 50 ms while it runs, so a freeze, a slow restore
// or slow faults after it show as a longer gap. It is what the workload
// itself saw, beside phaul's own downtime figure.
func (st logState) longestStall() time.Duration {
	var longest time.Duration
	for i := 1; i < len(st.steps); i++ {
		longest = max(longest, st.steps[i].Time.Sub(st.steps[i-1].Time))
	}
	return longest
}

// longestTickGap returns the longest gap of the ticker that ended after
// since (so it overlaps the time from since on), zero if none over 5 ms was
// logged.
func (st logState) longestTickGap(since time.Time) TickGap {
	var longest TickGap
	for _, g := range st.ticks {
		if g.End.After(since) && g.Gap > longest.Gap {
			longest = g
		}
	}
	return longest
}

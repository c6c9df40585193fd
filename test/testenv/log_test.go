package testenv

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseLog(t *testing.T) {
	step := func(n, verified uint64) string {
		return formatStep(Step{N: n, Time: time.Unix(0, int64(n)*50e6), PID: 1, Verified: verified})
	}
	lines := func(l ...string) string { return strings.Join(l, "\n") + "\n" }
	start := "start pid=1 pages=256 region=0x7f0000001000 threads=2 rate=1000 shm=0"
	tests := []struct {
		name      string
		log       string
		steps     int
		ticks     int
		malformed bool
		unhealthy bool
	}{
		{name: "empty", log: ""},
		{name: "healthy", log: lines(start, "ok tcp port=1", step(1, 0), step(2, 1), "ok flock", step(3, 1)), steps: 3},
		{name: "torn last line ignored", log: lines(step(1, 0), step(2, 1)) + "step=3 t=", steps: 2},
		{name: "tick lines", log: lines(step(1, 0), formatTick(TickGap{Gap: 6e6, End: time.Unix(0, 1)}), step(2, 1)), steps: 2, ticks: 1},
		{name: "exit line", log: lines(step(1, 1), "exit signal=TERM step=1"), steps: 1},
		{name: "corrupt", log: lines(step(1, 1), "CORRUPT page=3 want=4 got=3 word=2"), steps: 1, unhealthy: true},
		{name: "fail", log: lines(step(1, 1), "FAIL tcp recv: EOF"), steps: 1, unhealthy: true},
		{name: "step back", log: lines(step(5, 1), step(6, 1), step(4, 1)), steps: 3, unhealthy: true},
		{name: "step repeated", log: lines(step(5, 1), step(5, 1)), steps: 2, unhealthy: true},
		{name: "step skipped", log: lines(step(5, 1), step(7, 1)), steps: 2, unhealthy: true},
		{name: "verified back", log: lines(step(1, 3), step(2, 2)), steps: 2, unhealthy: true},
		{name: "second copy", log: lines(step(40, 9), step(1, 0), step(41, 9)), steps: 3, unhealthy: true},
		{name: "malformed step", log: lines("step=1 t=2 pid=x verified=0"), malformed: true},
		{name: "extra field", log: lines("step=1 t=2 pid=3 verified=0 x=1"), malformed: true},
		{name: "malformed tick", log: lines(step(1, 0), "tick gap=-5 t=2"), malformed: true},
		{name: "tick extra field", log: lines("tick gap=5 t=2 x=1"), malformed: true},
		{name: "torn tick ignored", log: lines(step(1, 0)) + "tick gap=", steps: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, err := parseLog([]byte(tt.log))
			if got := errors.Is(err, errMalformed); got != tt.malformed {
				t.Fatalf("parseLog error %v, want malformed=%v", err, tt.malformed)
			}
			if tt.malformed {
				return
			}
			if len(st.steps) != tt.steps {
				t.Errorf("%d steps, want %d", len(st.steps), tt.steps)
			}
			if len(st.ticks) != tt.ticks {
				t.Errorf("%d tick gaps, want %d", len(st.ticks), tt.ticks)
			}
			err = st.health()
			if got := errors.Is(err, ErrUnhealthy); got != tt.unhealthy {
				t.Errorf("health() = %v, want unhealthy=%v", err, tt.unhealthy)
			}
		})
	}
}

func TestLogRegion(t *testing.T) {
	st, err := parseLog([]byte("start pid=1 pages=256 region=0x7f0000001000 threads=2 rate=1000 shm=0\n"))
	if err != nil {
		t.Fatal(err)
	}
	addr, pages, err := st.region()
	if err != nil || addr != 0x7f0000001000 || pages != 256 {
		t.Errorf("region() = %#x, %d, %v; want 0x7f0000001000, 256", addr, pages, err)
	}
	if _, _, err := (logState{}).region(); err == nil {
		t.Error("region() of a log without start line: no error")
	}
}

func FuzzParseStep(f *testing.F) {
	f.Add("step=1 t=1795613475311701765 pid=1 verified=0")
	f.Add("step=18446744073709551615 t=9223372036854775807 pid=2147483647 verified=18446744073709551615")
	f.Add("step=1 t=9223372036854775808 pid=1 verified=0")
	f.Add("step=-1 t=0 pid=0 verified=0")
	f.Add("step= t= pid= verified=")
	f.Fuzz(func(t *testing.T, line string) {
		s, err := parseStep(line)
		if err != nil {
			return
		}
		s2, err := parseStep(formatStep(s))
		if err != nil || s2 != s {
			t.Fatalf("round trip of %q: %+v -> %+v, %v", line, s, s2, err)
		}
	})
}

func TestLongestStall(t *testing.T) {
	at := func(n uint64, ms int64) string {
		return formatStep(Step{N: n, Time: time.Unix(0, ms*1e6), PID: 1})
	}
	log := strings.Join([]string{at(1, 0), at(2, 50), at(3, 420), at(4, 470), at(5, 520)}, "\n") + "\n"
	st, err := parseLog([]byte(log))
	if err != nil {
		t.Fatal(err)
	}
	if got := st.longestStall(); got != 370*time.Millisecond {
		t.Fatalf("longest stall %v, want 370ms", got)
	}
	if got := (logState{}).longestStall(); got != 0 {
		t.Fatalf("no steps: %v", got)
	}
}

func FuzzParseTick(f *testing.F) {
	f.Add("tick gap=206358139 t=1796667923021189390")
	f.Add("tick gap=9223372036854775807 t=9223372036854775807")
	f.Add("tick gap=9223372036854775808 t=0")
	f.Add("tick gap=0 t=-1")
	f.Add("tick gap= t=")
	f.Add("tickgap=1 t=1")
	f.Fuzz(func(t *testing.T, line string) {
		g, err := parseTick(line)
		if err != nil {
			return
		}
		if g.Gap < 0 || g.End.UnixNano() < 0 {
			t.Fatalf("%q: negative %+v", line, g)
		}
		g2, err := parseTick(formatTick(g))
		if err != nil || g2 != g {
			t.Fatalf("round trip of %q: %+v -> %+v, %v", line, g, g2, err)
		}
	})
}

func TestLongestTickGap(t *testing.T) {
	ms := func(n int64) time.Time { return time.Unix(0, n*1e6) }
	gap := func(ms int64, end time.Time) string {
		return formatTick(TickGap{Gap: time.Duration(ms) * time.Millisecond, End: end})
	}
	at := func(n uint64, ms int64) string {
		return formatStep(Step{N: n, Time: time.Unix(0, ms*1e6), PID: 1})
	}
	log := strings.Join([]string{
		at(1, 1000), gap(90, ms(1020)), at(2, 1050), gap(7, ms(1080)), at(3, 1100),
		at(4, 1400), gap(300, ms(1410)), at(5, 1450), gap(12, ms(1470)), at(6, 1500),
	}, "\n") + "\n"
	st, err := parseLog([]byte(log))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		since time.Time
		want  time.Duration
	}{
		{name: "whole log", since: time.Time{}, want: 300 * time.Millisecond},
		{name: "since before the first", since: ms(0), want: 300 * time.Millisecond},
		{name: "gap ends after the mark", since: ms(1200), want: 300 * time.Millisecond},
		{name: "ended at the mark", since: ms(1410), want: 12 * time.Millisecond},
		{name: "after the stall", since: ms(1420), want: 12 * time.Millisecond},
		{name: "before the stall", since: ms(1021), want: 300 * time.Millisecond},
		{name: "none after", since: ms(1470), want: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := st.longestTickGap(tt.since).Gap; got != tt.want {
				t.Errorf("longestTickGap(%v) = %v, want %v", tt.since.UnixMilli(), got, tt.want)
			}
		})
	}
	if got := (logState{}).longestTickGap(time.Time{}); got != (TickGap{}) {
		t.Errorf("no tick lines: %+v", got)
	}
}

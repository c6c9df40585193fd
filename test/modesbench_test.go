package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/phaul"
	"github.com/phaul/phaul/test/testenv"
)

// benchModes are the modes BenchmarkModes runs, in its columns' order.
var benchModes = []string{"cold", "precopy", "postcopy", "hybrid"}

// linkBytesPerSec is BenchmarkModes' shaped link: 1 Gbit/s.
const linkBytesPerSec = 125e6

// BenchmarkModes migrates the same workload cold, in pre-copy, post-copy
// and hybrid mode side by side in each iteration, over a 1 Gbit/s shaped
// link to a destination serving with --lazy-restore, under equal memory
// conditions (a fresh workload and warmed memory for each): 128 MiB, 1 GiB
// and (without -short) 4 GiB workloads dirtying 8 and 64 MiB/s. Every
// migration must succeed and leave one healthy copy on the destination.
//
// Per mode it reports phaul's downtime; the stall the workload's 1 ms
// ticker saw from just before the migration on; the total time; the bytes
// on the wire (post-copy's fetches included: they share the session); the
// time until every page is on the destination (cold and pre-copy: the
// total; post-copy and hybrid: PostcopyDone); the total against the ideal,
// the workload's bytes at the link's rate; for post-copy and hybrid the
// p99 of faults that fetched from the source; and the time before the
// freeze besides pre-copy's rounds: CRIU's start, the hello, and any wait
// for the host-wide dump lock. Every phaul migration on this host takes
// that lock, so another one holding it delays the freeze while the
// workload dirties memory, which inflates pre-copy's and hybrid's final
// set: each migration starts once the lock is free, and a long wait is
// logged. A table is printed at the end.
func BenchmarkModes(b *testing.B) {
	var rows []modesRow
	for _, mib := range []int{128, 1024, 4096} {
		for _, rate := range []int{8, 64} {
			name := fmt.Sprintf("%dMiB/%dMiBps", mib, rate)
			b.Run(name, func(b *testing.B) {
				if mib > 1024 && testing.Short() {
					b.Skip("SKIP: the 4 GiB cases are left out with -short")
				}
				row := benchModesCase(b, mib, rate)
				row.name = name
				rows = append(rows, row)
				b.Logf("\n%s", modesTable([]modesRow{row}))
			})
		}
	}
	if len(rows) > 0 {
		fmt.Printf("BenchmarkModes summary (1 Gbit/s link, serve --lazy-restore; means)\n%s", modesTable(rows))
	}
}

// modeRun is one mode's sums over a case's iterations, then their means.
type modeRun struct {
	down, tick, stall, total, allMem time.Duration
	wire, postcopyWire, preResume    float64 // bytes
	remoteP99                        time.Duration
	rounds                           float64       // pre-copy rounds before the freeze
	beforeFreeze                     time.Duration // connect to freeze, less the rounds and the prefault
}

func (m *modeRun) add(o modeRun) {
	m.down += o.down
	m.tick += o.tick
	m.stall += o.stall
	m.total += o.total
	m.allMem += o.allMem
	m.wire += o.wire
	m.postcopyWire += o.postcopyWire
	m.preResume += o.preResume
	m.remoteP99 += o.remoteP99
	m.rounds += o.rounds
	m.beforeFreeze += o.beforeFreeze
}

func (m *modeRun) div(n int) {
	d := time.Duration(n)
	m.down, m.tick, m.stall, m.total, m.allMem, m.remoteP99 = m.down/d, m.tick/d, m.stall/d, m.total/d, m.allMem/d, m.remoteP99/d
	m.beforeFreeze /= d
	f := float64(n)
	m.wire, m.postcopyWire, m.preResume, m.rounds = m.wire/f, m.postcopyWire/f, m.preResume/f, m.rounds/f
}

type modesRow struct {
	name  string
	ideal time.Duration // the workload's bytes at the link's rate
	modes map[string]*modeRun
}

func benchModesCase(b *testing.B, mib, rate int) modesRow {
	e := newEnv(b, testenv.HostsOpts{RateBitsPerSec: 8 * linkBytesPerSec})
	e.startServe("--lazy-restore")
	opts := testenv.WorkloadOpts{MiB: mib, Threads: 2, PagesPerSec: rate << 8}
	warm := max(1<<30, (3*mib+256)<<20)
	row := modesRow{
		ideal: time.Duration(float64(mib<<20) / linkBytesPerSec * float64(time.Second)),
		modes: map[string]*modeRun{},
	}
	for _, mode := range benchModes {
		row.modes[mode] = &modeRun{}
	}
	n := 0
	for b.Loop() {
		n++
		for _, mode := range benchModes {
			row.modes[mode].add(migrateMode(b, e, opts, warm, mode))
		}
	}
	for _, mode := range benchModes {
		m := row.modes[mode]
		m.div(n)
		b.ReportMetric(msOf(m.down), mode+"-downtime-ms")
		b.ReportMetric(msOf(m.tick), mode+"-stall-ms")
		b.ReportMetric(msOf(m.stall), mode+"-step-stall-ms")
		b.ReportMetric(msOf(m.total), mode+"-total-ms")
		b.ReportMetric(msOf(m.allMem), mode+"-all-memory-ms")
		b.ReportMetric(m.wire/(1<<20), mode+"-wire-MiB")
		b.ReportMetric(float64(m.total)/float64(row.ideal), mode+"-x-total-vs-ideal")
		b.ReportMetric(msOf(m.beforeFreeze), mode+"-before-freeze-ms")
		if mode == "postcopy" || mode == "hybrid" {
			b.ReportMetric(msOf(m.remoteP99), mode+"-remote-fault-p99-ms")
			b.ReportMetric(m.postcopyWire/(1<<20), mode+"-postcopy-MiB")
		}
		if mode != "cold" {
			cold := row.modes["cold"]
			b.ReportMetric(float64(m.down)/float64(cold.down), "x-downtime-"+mode+"-vs-cold")
			b.ReportMetric(float64(m.tick)/float64(cold.tick), "x-stall-"+mode+"-vs-cold")
		}
	}
	b.ReportMetric(msOf(row.ideal), "ideal-total-ms")
	return row
}

// migrateMode migrates a fresh workload in mode and checks that exactly
// one healthy copy runs on the destination afterwards.
func migrateMode(b *testing.B, e *env, opts testenv.WorkloadOpts, warm int, mode string) modeRun {
	w := testenv.StartWorkload(b, e.hosts.Src, opts)
	w.WaitProgress(b, 2)
	warmMemoryBytes(warm)
	waitDumpLock(b)
	mark := time.Now()
	r := e.migrateQuiet(w.PID(), "--mode", mode)
	if r.code != 0 || r.str("result") != "ok" {
		b.Fatalf("migrate --mode %s of %d MiB: exit %d, result %q\n%s\nserve log (end):\n%s",
			mode, opts.MiB, r.code, r.str("result"), r.out, tail(e.readServeLog(), 80))
	}
	e.assertMigrated(w, r) // one copy, on the destination, stepping, verified twice, healthy
	tick, err := w.LongestTickGap(mark)
	if err != nil {
		b.Fatal(err)
	}
	stall, err := w.LongestStall()
	if err != nil {
		b.Fatal(err)
	}
	w.Kill(b)
	ms := func(key string) time.Duration { return time.Duration(r.num(key) * float64(time.Millisecond)) }
	m := modeRun{down: ms("downtime_ms"), tick: tick, stall: stall, total: ms("total_ms"), wire: r.num("bytes_wire")}
	m.allMem = m.total
	var rounds []string
	for _, x := range r.stats["rounds"].([]any) {
		round, _ := x.(map[string]any)
		if round["kind"] == "precopy" {
			m.rounds++
		}
		rounds = append(rounds, fmt.Sprintf("%v:%v pages/%v ms", round["kind"], round["dirty_pages"], round["duration_ms"]))
	}
	var phases []string
	for _, x := range r.stats["phases"].([]any) {
		p, _ := x.(map[string]any)
		phases = append(phases, fmt.Sprintf("%v@%v", p["phase"], p["t_ms"]))
	}
	m.beforeFreeze = time.Duration((phaseMS(b, r, "dump") - phaseMS(b, r, "connect") - r.num("prefault_ms")) * float64(time.Millisecond))
	for _, x := range r.stats["rounds"].([]any) {
		if round, _ := x.(map[string]any); round["kind"] == "precopy" {
			d, _ := round["duration_ms"].(float64)
			m.beforeFreeze -= time.Duration(d * float64(time.Millisecond))
		}
	}
	if m.beforeFreeze > 3*time.Second {
		b.Logf("WARNING: %s %d MiB: %v from connect to the freeze besides the rounds: did another migration on this host hold the dump lock? Its total (and pre-copy's and hybrid's final set) are inflated",
			mode, opts.MiB, m.beforeFreeze.Round(time.Millisecond))
	}
	b.Logf("%s %d MiB: downtime %.0f ms, ticker stall %v, total %.0f ms; phases %s; rounds %s; stop %q",
		mode, opts.MiB, msOf(m.down), tick, msOf(m.total), strings.Join(phases, " "), strings.Join(rounds, " "), r.str("stop_reason"))
	if mode != "postcopy" && mode != "hybrid" {
		return m
	}
	pc, ok := r.stats["postcopy"].(map[string]any)
	if !ok {
		b.Fatalf("migrate --mode %s: stats without postcopy: %v", mode, r.stats)
	}
	num := func(key string) float64 { f, _ := pc[key].(float64); return f }
	m.postcopyWire = num("bytes_wire")
	m.remoteP99 = time.Duration(num("remote_fault_p99_ms") * float64(time.Millisecond))
	// Every page is on the destination when PostcopyDone arrives: the
	// post-copy phase's start plus its length. total_ms also holds
	// ending the source's held tree after it.
	m.allMem = time.Duration((phaseMS(b, r, "postcopy") + num("ms")) * float64(time.Millisecond))
	// bytes_wire counts the session's TCP bytes both ways, the fetch
	// streams included (one session; a reconnect starts a new count).
	m.preResume = m.wire - m.postcopyWire
	if num("recoveries") == 0 && m.wire < m.postcopyWire {
		b.Fatalf("migrate --mode %s: bytes_wire %.0f below post-copy's %.0f: the fetches are not counted", mode, m.wire, m.postcopyWire)
	}
	b.Logf("%s %d MiB: bytes_wire %.1f MiB = %.1f MiB before the resume + %.1f MiB post-copy (%v pages remote, %v fault + %v fill served); all memory at %.0f ms, total %.0f ms",
		mode, opts.MiB, m.wire/(1<<20), m.preResume/(1<<20), m.postcopyWire/(1<<20),
		num("remote_pages"), num("served_fault_pages"), num("served_fill_pages"), msOf(m.allMem), msOf(m.total))
	return m
}

// waitDumpLock waits until no phaul migration on this host holds the
// host-wide dump lock (other tests may run beside the benchmark), so that
// the migration about to start does not begin by waiting for it.
func waitDumpLock(b *testing.B) {
	b.Helper()
	path := phaul.DefaultMigrateConfig().DumpLock
	t0 := time.Now()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		b.Fatal(err)
	}
	release, err := linux.LockFile(path, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	release()
	if d := time.Since(t0); d > time.Second {
		b.Logf("waited %v for %s: another migration on this host held it", d.Round(time.Millisecond), path)
	}
}

// phaseMS returns when phase began, in ms since the migration began.
func phaseMS(b *testing.B, r result, phase string) float64 {
	b.Helper()
	phases, _ := r.stats["phases"].([]any)
	for _, x := range phases {
		if p, _ := x.(map[string]any); p["phase"] == phase {
			f, _ := p["t_ms"].(float64)
			return f
		}
	}
	b.Fatalf("stats without phase %q: %v", phase, r.stats["phases"])
	return 0
}

// modesTable prints one block per measure: a row per case, a column per
// mode.
func modesTable(rows []modesRow) string {
	var w strings.Builder
	block := func(title string, modes []string, extra string, val func(modesRow, *modeRun) string, extraVal func(modesRow) string) {
		fmt.Fprintf(&w, "%s\n%-16s |", title, "case")
		if extra != "" {
			fmt.Fprintf(&w, " %13s |", extra)
		}
		for _, mode := range modes {
			fmt.Fprintf(&w, " %13s", mode)
		}
		w.WriteString("\n")
		for _, r := range rows {
			fmt.Fprintf(&w, "%-16s |", r.name)
			if extra != "" {
				fmt.Fprintf(&w, " %13s |", extraVal(r))
			}
			for _, mode := range modes {
				fmt.Fprintf(&w, " %13s", val(r, r.modes[mode]))
			}
			w.WriteString("\n")
		}
	}
	msCol := func(f func(*modeRun) time.Duration) func(modesRow, *modeRun) string {
		return func(_ modesRow, m *modeRun) string { return fmt.Sprintf("%.0f", msOf(f(m))) }
	}
	post := []string{"postcopy", "hybrid"}
	block("downtime (phaul, ms)", benchModes, "", msCol(func(m *modeRun) time.Duration { return m.down }), nil)
	block("workload stall (ticker's longest gap from the migration on, ms)", benchModes, "",
		msCol(func(m *modeRun) time.Duration { return m.tick }), nil)
	block("workload step stall (longest gap between its 50 ms steps, ms)", benchModes, "",
		msCol(func(m *modeRun) time.Duration { return m.stall }), nil)
	block("total (ms) and total/ideal; ideal = workload bytes / 125 MB/s", benchModes, "ideal",
		func(r modesRow, m *modeRun) string {
			return fmt.Sprintf("%.0f %4.2fx", msOf(m.total), float64(m.total)/float64(r.ideal))
		}, func(r modesRow) string { return fmt.Sprintf("%.0f", msOf(r.ideal)) })
	block("all memory on the destination (ms; post-copy and hybrid: PostcopyDone)", benchModes, "",
		msCol(func(m *modeRun) time.Duration { return m.allMem }), nil)
	block("wire (MiB, post-copy's fetches included)", benchModes, "",
		func(_ modesRow, m *modeRun) string { return fmt.Sprintf("%.1f", m.wire/(1<<20)) }, nil)
	block("before the freeze besides pre-copy's rounds (ms): CRIU's start, hello, waits for the host-wide dump lock", benchModes, "",
		msCol(func(m *modeRun) time.Duration { return m.beforeFreeze }), nil)
	block("pre-copy rounds before the freeze", []string{"precopy", "hybrid"}, "",
		func(_ modesRow, m *modeRun) string { return fmt.Sprintf("%.1f", m.rounds) }, nil)
	block("post-copy: MiB fetched after the resume / remote fault p99 (ms)", post, "",
		func(_ modesRow, m *modeRun) string {
			return fmt.Sprintf("%.1f/%.1f", m.postcopyWire/(1<<20), msOf(m.remoteP99))
		}, nil)
	return w.String()
}

package test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/test/testenv"
)

// BenchmarkPrecopy compares pre-copy with cold migration over a 1 Gbit/s
// shaped link, both in the same run under equal memory conditions (each
// migration gets a fresh workload and warmed memory): 256 MiB, 1 GiB and
// (without -short) 4 GiB workloads dirtying 8 and 64 MiB/s. Per case:
// downtime, total time, wire bytes and rounds of each, the ratios
// precopy/cold (lower is better), and the floor: the time pre-copy's
// frozen tree spent in CRIU's dump and restore, beside the floor predicted
// before round 1 and the downtime besides the last dirty set. A table is
// printed at the end.
func BenchmarkPrecopy(b *testing.B) {
	var rows []precopyRow
	for _, mib := range []int{256, 1024, 4096} {
		for _, rate := range []int{8, 64} {
			name := fmt.Sprintf("%dMiB/%dMiBps", mib, rate)
			b.Run(name, func(b *testing.B) {
				if mib > 1024 && testing.Short() {
					b.Skip("SKIP: the 4 GiB cases are left out with -short")
				}
				row := benchPrecopy(b, mib, rate)
				row.name = name
				rows = append(rows, row)
				b.Logf("\n%s", precopyTable([]precopyRow{row}))
			})
		}
	}
	if len(rows) > 0 {
		fmt.Printf("BenchmarkPrecopy summary (1 Gbit/s link; ms, MiB)\n%s", precopyTable(rows))
	}
}

type precopyRow struct {
	name                string
	coldDown, preDown   time.Duration
	coldStall, preStall time.Duration // the longest gap between the workload's own steps
	coldTick, preTick   time.Duration // the longest gap of its 1 ms ticker from the migration on
	coldTotal, preTotal time.Duration
	coldWire, preWire   float64
	preRounds           float64
	floor               time.Duration // measured: CRIU's dump + restore
	predicted, criuPart time.Duration // floor predicted before round 1; downtime besides the last dirty set
	stop                string
}

func benchPrecopy(b *testing.B, mib, rate int) precopyRow {
	e := newEnv(b, testenv.HostsOpts{RateBitsPerSec: 1e9})
	e.startServe()
	opts := testenv.WorkloadOpts{MiB: mib, Threads: 2, PagesPerSec: rate << 8}
	warm := max(1<<30, (3*mib+256)<<20)
	var row precopyRow
	n := 0
	for b.Loop() {
		n++
		for _, mode := range []string{"cold", "precopy"} {
			w := testenv.StartWorkload(b, e.hosts.Src, opts)
			w.WaitProgress(b, 2)
			warmMemoryBytes(warm)
			mark := time.Now()
			r := e.migrateQuiet(w.PID(), "--mode", mode)
			if r.code != 0 || r.str("result") != "ok" {
				b.Fatalf("migrate --mode %s: exit %d\n%s", mode, r.code, r.out)
			}
			down := time.Duration(r.num("downtime_ms") * float64(time.Millisecond))
			stall := workloadStall(b, w) // waits for steps of the restored copy
			tick, err := w.LongestTickGap(mark)
			if err != nil {
				b.Fatal(err)
			}
			total := time.Duration(r.num("total_ms") * float64(time.Millisecond))
			if mode == "cold" {
				row.coldDown += down
				row.coldStall += stall
				row.coldTick += tick
				row.coldTotal += total
				row.coldWire += r.num("bytes_wire")
			} else {
				row.preDown += down
				row.preStall += stall
				row.preTick += tick
				row.preTotal += total
				row.preWire += r.num("bytes_wire")
				rounds, _ := r.stats["rounds"].([]any)
				row.preRounds += float64(len(rounds))
				row.floor += time.Duration((r.num("criu_dump_ms") + r.num("criu_restore_ms")) * float64(time.Millisecond))
				row.predicted += time.Duration(r.num("floor_ms") * float64(time.Millisecond))
				row.criuPart += time.Duration(r.num("downtime_criu_ms") * float64(time.Millisecond))
				row.stop = r.str("stop_reason")
			}
			w.Kill(b)
		}
	}
	d := time.Duration(n)
	row.coldDown, row.preDown, row.coldTotal, row.preTotal, row.floor = row.coldDown/d, row.preDown/d, row.coldTotal/d, row.preTotal/d, row.floor/d
	row.predicted, row.criuPart = row.predicted/d, row.criuPart/d
	row.coldStall, row.preStall = row.coldStall/d, row.preStall/d
	row.coldTick, row.preTick = row.coldTick/d, row.preTick/d
	row.coldWire /= float64(n)
	row.preWire /= float64(n)
	row.preRounds /= float64(n)
	b.ReportMetric(float64(row.preDown)/float64(row.coldDown), "x-downtime-precopy-vs-cold")
	b.ReportMetric(float64(row.preTotal)/float64(row.coldTotal), "x-total-precopy-vs-cold")
	b.ReportMetric(row.preWire/row.coldWire, "x-wire-precopy-vs-cold")
	b.ReportMetric(msOf(row.coldDown), "cold-downtime-ms")
	b.ReportMetric(msOf(row.preDown), "precopy-downtime-ms")
	b.ReportMetric(msOf(row.coldStall), "cold-workload-stall-ms")
	b.ReportMetric(msOf(row.preStall), "precopy-workload-stall-ms")
	b.ReportMetric(msOf(row.coldTick), "cold-workload-tick-stall-ms")
	b.ReportMetric(msOf(row.preTick), "precopy-workload-tick-stall-ms")
	b.ReportMetric(msOf(row.floor), "precopy-floor-ms")
	b.ReportMetric(msOf(row.predicted), "precopy-predicted-floor-ms")
	b.ReportMetric(row.preRounds, "precopy-rounds")
	return row
}

func precopyTable(rows []precopyRow) string {
	var w strings.Builder
	fmt.Fprintf(&w, "%-16s | %9s %9s %7s | %9s %9s %7s | %8s %8s %7s | %6s %7s %7s %7s | %s\n",
		"case", "cold-down", "pre-down", "x-down", "cold-tot", "pre-tot", "x-tot",
		"cold-MiB", "pre-MiB", "x-wire", "rounds", "floor", "predict", "criu", "stop")
	for _, r := range rows {
		fmt.Fprintf(&w, "%-16s | %9.0f %9.0f %7.3f | %9.0f %9.0f %7.2f | %8.1f %8.1f %7.2f | %6.1f %7.0f %7.0f %7.0f | %s\n",
			r.name, msOf(r.coldDown), msOf(r.preDown), float64(r.preDown)/float64(r.coldDown),
			msOf(r.coldTotal), msOf(r.preTotal), float64(r.preTotal)/float64(r.coldTotal),
			r.coldWire/(1<<20), r.preWire/(1<<20), r.preWire/r.coldWire, r.preRounds, msOf(r.floor), msOf(r.predicted), msOf(r.criuPart), r.stop)
	}
	return w.String()
}

// workloadStall waits for a few steps of the migrated workload and returns
// the longest gap between two of its steps: the stall the workload itself
// saw, freeze, restore and first faults included.
func workloadStall(b *testing.B, w *testenv.Workload) time.Duration {
	b.Helper()
	w.WaitProgress(b, 3)
	d, err := w.LongestStall()
	if err != nil {
		b.Fatal(err)
	}
	return d
}

package test

import (
	"context"
	"fmt"
	"runtime/debug"
	"testing"
	"time"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/test/testenv"
)

// BenchmarkColdMigration measures phaul's downtime against a baseline run
// in the same benchmark on the same host: a local CRIU dump to disk and a
// restore from it, with no network and no protocol (the least a cold
// migration can cost). Memory conditions are equal: the baseline dumps with
// the tree left running, so its restore, like phaul's, needs memory the
// original still holds, and before each measured step the benchmark touches
// and frees warmBytes, so neither pays this VM's first-touch cost (about
// 2.5 ms/MiB) where the other does not. Reported:
// x-downtime-vs-local-criu (phaul downtime / baseline; lower is better),
// and both in milliseconds.
func BenchmarkColdMigration(b *testing.B) {
	for _, mib := range []int{64, 256} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) {
			e := newEnv(b, testenv.HostsOpts{})
			e.startServe()
			ctx := context.Background()
			bin, err := criu.Locate(ctx, "", nil)
			if err != nil {
				b.Fatal(err)
			}
			opts := testenv.WorkloadOpts{MiB: mib, PagesPerSec: 1000}
			var base, downtime, stall time.Duration
			var wireBytes float64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				// In the benchmark's own netns, where its CRIU runs.
				w := testenv.StartWorkload(b, nil, opts)
				dir := b.TempDir()
				warmMemory()
				b.StartTimer()
				t0 := time.Now()
				if err := bin.Dump(ctx, criu.DumpRequest{Pid: w.PID(), ImagesDir: dir, LeaveRunning: true}, nil); err != nil {
					b.Fatal(err)
				}
				if _, err := bin.Restore(ctx, criu.RestoreRequest{ImagesDir: dir}, nil); err != nil {
					b.Fatal(err)
				}
				base += time.Since(t0)
				b.StopTimer()
				w.Kill(b)

				w = testenv.StartWorkload(b, e.hosts.Src, opts)
				warmMemory()
				b.StartTimer()
				r := e.migrate(w.PID(), "--mode", "cold")
				b.StopTimer()
				if r.code != 0 {
					b.Fatalf("migrate exit %d\n%s", r.code, r.out)
				}
				downtime += time.Duration(r.num("downtime_ms") * float64(time.Millisecond))
				stall += workloadStall(b, w)
				wireBytes += r.num("bytes_wire")
				w.Kill(b)
				b.StartTimer()
			}
			n := float64(b.N)
			b.ReportMetric(float64(downtime)/float64(base), "x-downtime-vs-local-criu")
			b.ReportMetric(float64(downtime.Milliseconds())/n, "downtime-ms")
			b.ReportMetric(float64(stall.Milliseconds())/n, "workload-stall-ms")
			b.ReportMetric(float64(base.Milliseconds())/n, "local-criu-ms")
			b.ReportMetric(wireBytes/n/float64(mib<<20), "wire-bytes-per-byte")
		})
	}
}

// warmBytes is more than a migration of the largest size here allocates
// (page cache on both sides and the restored copy).
const warmBytes = 2 << 30

// warmMemory touches warmBytes and returns them to the kernel, so the next
// allocations reuse memory the hypervisor has already backed.
func warmMemory() {
	b := make([]byte, warmBytes)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	b = nil
	debug.FreeOSMemory()
}

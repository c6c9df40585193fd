package transport

import (
	"testing"
	"time"
)

// BenchmarkControlRTTUnderLoad measures control-stream ping RTT while two
// bulk streams on the same session write as fast as they can, against the
// idle RTT measured in the same run. ns/op is the mean RTT under load.
// Percentiles need many samples: run with -benchtime=2000x.
//
// frame=64KiB is Stream.Write as shipped; frame=window lets yamux send up
// to a whole stream window per frame, as a plain yamux.Stream does.
func BenchmarkControlRTTUnderLoad(b *testing.B) {
	frames := []struct {
		name  string
		bytes int
	}{
		{"frame=16KiB", 16 << 10},
		{"frame=64KiB", maxFrameBytes},
		{"frame=window", 0},
	}
	const idlePings = 500
	b.Run("loopback", func(b *testing.B) {
		for _, f := range frames {
			b.Run(f.name, func(b *testing.B) {
				rep := loopbackRTT(b, rttParams{IdlePings: idlePings, LoadPings: b.N, BulkStreams: 2, FrameBytes: f.bytes})
				reportRTT(b, rep)
			})
		}
	})
	b.Run("shaped", func(b *testing.B) {
		link := newShapedLink(b)
		pk := newPKI(b)
		serverDir, clientDir := pk.issue(b, linkAddrB), pk.issue(b, "client-a.example")
		for _, f := range frames {
			b.Run(f.name, func(b *testing.B) {
				rep := link.measure(b, serverDir, clientDir, rttParams{IdlePings: idlePings, LoadPings: b.N, BulkStreams: 2, FrameBytes: f.bytes})
				reportRTT(b, rep)
			})
		}
	})
}

func reportRTT(b *testing.B, rep rttReport) {
	b.Helper()
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	var sum time.Duration
	for _, d := range rep.Load {
		sum += d
	}
	b.ReportMetric(float64(sum)/float64(max(len(rep.Load), 1)), "ns/op")
	b.ReportMetric(us(pct(rep.Idle, 50)), "µs-p50-idle")
	b.ReportMetric(us(pct(rep.Idle, 99)), "µs-p99-idle")
	b.ReportMetric(us(pct(rep.Load, 50)), "µs-p50-load")
	b.ReportMetric(us(pct(rep.Load, 99)), "µs-p99-load")
	b.ReportMetric(float64(pct(rep.Load, 50))/float64(pct(rep.Idle, 50)), "x-p50-slowdown")
	b.ReportMetric(float64(pct(rep.Load, 99))/float64(pct(rep.Idle, 99)), "x-p99-slowdown")
	b.ReportMetric(rep.mbps(), "MB/s-bulk")
}

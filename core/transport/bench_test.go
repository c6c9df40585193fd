package transport

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkControlRTTUnderLoad measures the round-trip time of pings on the
// control stream while two bulk streams of the same session write as fast
// as they can, against the idle RTT measured in the same run. ns/op is the
// mean RTT under load. Percentiles need many samples: run with
// -benchtime=2000x. Variants:
//
//	frames=shipped       Stream.Write as shipped: frames of 16-64 KiB
//	frames=window        yamux sends up to a whole window per frame
//	control=second-conn  pings on a second TLS connection (the last resort)
//	window=min           Config.RTT of 1µs: the smallest window, 256 KiB
//
// loopback runs both ends in this process over 127.0.0.1. shaped runs them
// in two network namespaces joined by a veth pair whose sending side is a
// 200 Mbit/s token bucket, with TCP_NOTSENT_LOWAT off and at 16 KiB; it
// needs root, ip and tc, and skips saying so otherwise.
func BenchmarkControlRTTUnderLoad(b *testing.B) {
	variants := []struct {
		name string
		p    rttParams
	}{
		{"frames=shipped", rttParams{}},
		{"frames=window", rttParams{Unchunked: true}},
		{"control=second-conn", rttParams{SeparateConn: true}},
		{"window=min", rttParams{RTT: time.Microsecond}},
	}
	const idlePings = 500
	b.Run("loopback", func(b *testing.B) {
		for _, v := range variants {
			b.Run(v.name, func(b *testing.B) {
				p := v.p
				p.IdlePings, p.LoadPings, p.BulkStreams = idlePings, b.N, 2
				reportRTT(b, loopbackRTT(b, p))
			})
		}
	})
	b.Run("shaped", func(b *testing.B) {
		link := newShapedLink(b)
		pk := newPKI(b)
		serverDir, clientDir := pk.issue(b, linkAddrB), pk.issue(b, "client-a.example")
		for _, lowat := range []uint32{0, 16 << 10} {
			name := "lowat=off"
			if lowat > 0 {
				name = fmt.Sprintf("lowat=%dKiB", lowat>>10)
			}
			b.Run(name, func(b *testing.B) {
				link.setNotSentLowat(b, lowat)
				for _, v := range variants {
					b.Run(v.name, func(b *testing.B) {
						p := v.p
						p.IdlePings, p.LoadPings, p.BulkStreams = idlePings, b.N, 2
						p.Bandwidth = 200e6 / 8 // the configuration matching the link
						reportRTT(b, link.measure(b, serverDir, clientDir, p))
					})
				}
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

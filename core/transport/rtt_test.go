package transport

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
)

// This file holds the harness behind BenchmarkControlRTTUnderLoad: the
// dialer pings over the control stream while bulk streams write as fast as
// they can; the listener echoes pings and discards bulk data.

// rttParams says what measureRTT does.
type rttParams struct {
	IdlePings   int           // pings before the bulk streams start
	LoadPings   int           // pings while they run
	BulkStreams int           // streams writing as fast as they can
	Bandwidth   int64         // Config.Bandwidth of both ends; 0: the default
	RTT         time.Duration // Config.RTT of both ends; 0: the default
	// Unchunked lets yamux send a whole window per frame, as a plain
	// yamux.Stream does, instead of Stream.Write's frames.
	Unchunked bool
	// SeparateConn pings over a second session (a second TLS connection)
	// instead of the bulk session's control stream.
	SeparateConn bool
}

// config returns DefaultConfig for p with id.
func (p rttParams) config(id *Identity) Config {
	cfg := DefaultConfig()
	cfg.Identity = id
	if p.Bandwidth > 0 {
		cfg.Bandwidth = p.Bandwidth
	}
	if p.RTT > 0 {
		cfg.RTT = p.RTT
	}
	return cfg
}

// sessions is how many sessions the dialer opens for p.
func (p rttParams) sessions() int {
	if p.SeparateConn {
		return 2
	}
	return 1
}

// rttReport is what measureRTT found; durations are sorted.
type rttReport struct {
	Idle, Load []time.Duration
	BulkBytes  int64
	BulkTime   time.Duration
}

func (r rttReport) String() string {
	return fmt.Sprintf("idle p50 %v p99 %v | load p50 %v p99 %v | bulk %.0f MB/s",
		pct(r.Idle, 50), pct(r.Idle, 99), pct(r.Load, 50), pct(r.Load, 99), r.mbps())
}

func (r rttReport) mbps() float64 {
	return float64(r.BulkBytes) / r.BulkTime.Seconds() / 1e6
}

// pct returns the p-th percentile of sorted samples.
func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

// bulkBuf is what bulk streams write: 1 MiB per Write, as a page sender
// would hand over a batch of pages.
const bulkWriteBytes = 1 << 20

// measureRTT runs the dialing side of the measurement on p.sessions()
// sessions: bulk streams go on the first, pings on the last. The peer must
// run serveRTT on each.
func measureRTT(ctx context.Context, ss []*Session, p rttParams) (rep rttReport, err error) {
	var ctl *Stream
	for _, s := range ss {
		if p.Unchunked {
			s.frameBytes = 1 << 30
		}
		if ctl, err = s.OpenStream(ctx, KindControl); err != nil {
			return rep, err
		}
		defer ctl.Close()
	}
	bulk := ss[0]
	if rep.Idle, err = ping(ctl, p.IdlePings); err != nil {
		return rep, fmt.Errorf("idle pings: %w", err)
	}

	// The bulk writers stop when stop closes; flowing closes once they
	// have written several windows, so queues are full when pings start.
	var (
		stop    = make(chan struct{})
		flowing = make(chan struct{})
		once    sync.Once
		written atomic.Int64
		full    = int64(8 << 20)
	)
	buf := make([]byte, bulkWriteBytes)
	rand.Read(buf)
	var g errgroup.Group
	start := time.Now()
	for range p.BulkStreams {
		st, err := bulk.OpenStream(ctx, KindPages)
		if err != nil {
			close(stop)
			return rep, errors.Join(err, g.Wait())
		}
		g.Go(func() error {
			defer st.Close()
			for {
				select {
				case <-stop:
					return nil
				default:
				}
				n, err := st.Write(buf)
				if written.Add(int64(n)) >= full {
					once.Do(func() { close(flowing) })
				}
				if err != nil {
					return fmt.Errorf("bulk write: %w", err)
				}
			}
		})
	}
	if p.BulkStreams > 0 {
		<-flowing
	}
	rep.Load, err = ping(ctl, p.LoadPings)
	close(stop)
	err = errors.Join(err, g.Wait())
	rep.BulkBytes, rep.BulkTime = written.Load(), time.Since(start)
	return rep, err
}

// ping sends n 8-byte pings on ctl and returns the sorted round-trip times.
func ping(ctl *Stream, n int) ([]time.Duration, error) {
	rtts := make([]time.Duration, 0, n)
	var out, in [8]byte
	for i := range n {
		binary.BigEndian.PutUint64(out[:], uint64(i))
		t0 := time.Now()
		if _, err := ctl.Write(out[:]); err != nil {
			return nil, err
		}
		if _, err := io.ReadFull(ctl, in[:]); err != nil {
			return nil, err
		}
		rtts = append(rtts, time.Since(t0))
		if in != out {
			return nil, fmt.Errorf("pong %x for ping %x", in, out)
		}
	}
	slices.Sort(rtts)
	return rtts, nil
}

// serveRTT is the listening side: it echoes the control stream and drains
// bulk streams. The dialer closes its bulk streams before the control
// stream, so once the control stream ends serveRTT closes the session, and
// the dialer waits for that (hangUp): closing the other way round would fail
// the window updates still in flight here.
func serveRTT(ctx context.Context, s *Session) error {
	defer s.Close()
	var (
		data    errgroup.Group // bulk stream readers; Wait after accepting ends
		ctlDone = make(chan error, 1)
		accept  = make(chan error, 1)
	)
	go func() {
		for {
			st, err := s.AcceptStream(ctx)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					err = nil
				}
				accept <- err
				return
			}
			if st.Kind() == KindControl {
				go func() {
					_, err := io.Copy(st, st)
					ctlDone <- errors.Join(err, st.Close())
				}()
				continue
			}
			data.Go(func() error {
				_, err := io.Copy(io.Discard, st)
				return errors.Join(err, st.Close())
			})
		}
	}()
	var err error
	select {
	case err = <-ctlDone:
		s.Close() // ends the accept loop
		err = errors.Join(err, <-accept)
	case err = <-accept:
		s.Close()
	}
	return errors.Join(err, data.Wait())
}

// hangUp waits for the listener to close s after a measurement, then
// closes s.
func hangUp(s *Session) error {
	defer s.Close()
	select {
	case <-s.Done():
		return nil
	case <-time.After(waitLimit):
		return errors.New("peer did not close the session")
	}
}

// loopbackRTT measures over TLS sessions on 127.0.0.1 in this process.
func loopbackRTT(tb testing.TB, p rttParams) rttReport {
	tb.Helper()
	pk := newPKI(tb)
	l := listen(tb, p.config(pk.identity(tb, "127.0.0.1")))
	clientCfg := p.config(pk.identity(tb, "client-a.example"))
	ctx := context.Background()
	var (
		clients []*Session
		g       errgroup.Group
	)
	for range p.sessions() {
		client, server := pair(tb, l, clientCfg)
		clients = append(clients, client)
		g.Go(func() error { return serveRTT(ctx, server) })
	}
	rep, err := measureRTT(ctx, clients, p)
	for _, c := range clients {
		err = errors.Join(err, hangUp(c))
	}
	if err = errors.Join(err, g.Wait()); err != nil {
		tb.Fatal(err)
	}
	return rep
}

// TestControlRTTUnderLoad runs the harness briefly on loopback. It checks
// that the harness works, logs the numbers and asserts no timing; the
// benchmark measures.
func TestControlRTTUnderLoad(t *testing.T) {
	for _, p := range []rttParams{
		{IdlePings: 50, LoadPings: 50, BulkStreams: 2},
		{IdlePings: 50, LoadPings: 50, BulkStreams: 1, SeparateConn: true},
	} {
		rep := loopbackRTT(t, p)
		t.Logf("loopback %+v: %v", p, rep)
		if len(rep.Idle) != p.IdlePings || len(rep.Load) != p.LoadPings || rep.BulkBytes == 0 {
			t.Fatalf("incomplete measurement: %d idle, %d load pings, %d bulk bytes", len(rep.Idle), len(rep.Load), rep.BulkBytes)
		}
	}
}

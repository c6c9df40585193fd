package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// TestListenerSurvivesBadPeers connects peers that are not TLS clients and
// checks that each is logged, dropped, and that the listener then still
// serves a good client.
func TestListenerSurvivesBadPeers(t *testing.T) {
	p := newPKI(t)
	clientCfg := testConfig(p.identity(t, "client-a.example"), nil)
	tests := []struct {
		name   string
		send   []byte
		reason string
	}{
		{"garbage", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "not TLS"},
		{"silent", nil, "handshake timeout"},
		{"truncated hello", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}, "handshake timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			log := newLogSink()
			cfg := testConfig(p.identity(t, "127.0.0.1"), log.logger())
			cfg.HandshakeTimeout = 100 * time.Millisecond
			l := listen(t, cfg)
			bad, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer bad.Close()
			if _, err := bad.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			m := log.wait(t, "peer refused")
			if m["reason"] != tt.reason || m["peer"] != bad.LocalAddr().String() {
				t.Errorf("logged %v, want reason %q for peer %s", m, tt.reason, bad.LocalAddr())
			}
			// The server hung up: reads end (with EOF or a reset).
			bad.SetReadDeadline(time.Now().Add(waitLimit))
			if _, err := io.Copy(io.Discard, bad); isTimeout(err) {
				t.Errorf("bad peer still connected: %v", err)
			}
			client, server := pair(t, l, clientCfg)
			echo(t, client, server)
		})
	}
}

// TestSilentPeerBlocksNoOne holds a handshake open and checks that another
// client gets through meanwhile, and that Close aborts the pending
// handshake (goleak checks its goroutine).
func TestSilentPeerBlocksNoOne(t *testing.T) {
	p := newPKI(t)
	cfg := testConfig(p.identity(t, "127.0.0.1"), nil)
	cfg.HandshakeTimeout = time.Hour
	l, err := Listen(context.Background(), "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	silent, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	clientCfg := testConfig(p.identity(t, "client-a.example"), nil)
	client, server := pair(t, l, clientCfg)
	echo(t, client, server)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	silent.SetReadDeadline(time.Now().Add(waitLimit))
	if _, err := io.Copy(io.Discard, silent); isTimeout(err) {
		t.Errorf("Close left the pending handshake open: %v", err)
	}
}

func TestCloseUnblocks(t *testing.T) {
	p := newPKI(t)
	serverCfg := testConfig(p.identity(t, "127.0.0.1"), nil)
	clientCfg := testConfig(p.identity(t, "client-a.example"), nil)
	tests := []struct {
		name string
		// run starts the blocking call and returns a function that
		// unblocks it.
		run func(t *testing.T) (block func() error, unblock func())
	}{
		{"Listener.Close unblocks Accept", func(t *testing.T) (func() error, func()) {
			l, err := Listen(context.Background(), "127.0.0.1:0", serverCfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			block := func() error { _, err := l.Accept(context.Background()); return err }
			return block, func() { l.Close() }
		}},
		{"Listen ctx unblocks Accept", func(t *testing.T) (func() error, func()) {
			ctx, cancel := context.WithCancel(context.Background())
			l, err := Listen(ctx, "127.0.0.1:0", serverCfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() })
			block := func() error { _, err := l.Accept(context.Background()); return err }
			return block, cancel
		}},
		{"Session.Close unblocks AcceptStream", func(t *testing.T) (func() error, func()) {
			_, server := pair(t, listen(t, serverCfg), clientCfg)
			block := func() error { _, err := server.AcceptStream(context.Background()); return err }
			return block, func() { server.Close() }
		}},
		{"peer Close unblocks AcceptStream", func(t *testing.T) (func() error, func()) {
			client, server := pair(t, listen(t, serverCfg), clientCfg)
			block := func() error { _, err := server.AcceptStream(context.Background()); return err }
			return block, func() { client.Close() }
		}},
		{"Session.Close unblocks Read", func(t *testing.T) (func() error, func()) {
			client, server := pair(t, listen(t, serverCfg), clientCfg)
			cs, err := client.OpenStream(context.Background(), KindControl)
			if err != nil {
				t.Fatal(err)
			}
			block := func() error { _, err := cs.Read(make([]byte, 1)); return err }
			return block, func() { server.Close() }
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			block, unblock := tt.run(t)
			errc := make(chan error, 1)
			go func() { errc <- block() }()
			unblock()
			select {
			case err := <-errc:
				if err == nil {
					t.Fatal("blocked call returned no error")
				}
				t.Logf("unblocked: %v", err)
			case <-time.After(waitLimit):
				t.Fatal("still blocked")
			}
		})
	}
}

func TestClosedErrors(t *testing.T) {
	p := newPKI(t)
	l := listen(t, testConfig(p.identity(t, "127.0.0.1"), nil))
	client, server := pair(t, l, testConfig(p.identity(t, "client-a.example"), nil))
	server.Close()
	if _, err := server.AcceptStream(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("AcceptStream after Close = %v, want net.ErrClosed", err)
	}
	<-client.Done()
	if _, err := client.OpenStream(context.Background(), KindControl); !errors.Is(err, net.ErrClosed) {
		t.Errorf("OpenStream after peer Close = %v, want net.ErrClosed", err)
	}
	l.Close()
	if _, err := l.Accept(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
	}
}

func TestOpenStreamRules(t *testing.T) {
	p := newPKI(t)
	l := listen(t, testConfig(p.identity(t, "127.0.0.1"), nil))
	client, server := pair(t, l, testConfig(p.identity(t, "client-a.example"), nil))
	ctx := context.Background()
	steps := []struct {
		name string
		s    *Session
		kind StreamKind
		want error
	}{
		{"server opens", server, KindControl, ErrWrongSide},
		{"unknown kind", client, StreamKind(9), ErrStreamKind},
		{"zero kind", client, StreamKind(0), ErrStreamKind},
		{"data before control", client, KindPages, ErrStreamKind},
		{"control", client, KindControl, nil},
		{"second control", client, KindControl, ErrStreamKind},
		{"images", client, KindImages, nil},
		{"pages", client, KindPages, nil},
		{"fetch", client, KindFetch, nil},
		{"past the last kind", client, KindFetch + 1, ErrStreamKind},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			s, err := st.s.OpenStream(ctx, st.kind)
			if !errors.Is(err, st.want) {
				t.Fatalf("OpenStream(%v) = %v, want %v", st.kind, err, st.want)
			}
			if err == nil {
				ss, err := server.AcceptStream(ctx)
				if err != nil || ss.Kind() != st.kind || ss.ID() != s.ID() {
					t.Fatalf("AcceptStream = %v, %v; want %v stream %d", ss, err, st.kind, s.ID())
				}
			}
		})
	}
	if _, err := client.AcceptStream(ctx); !errors.Is(err, ErrWrongSide) {
		t.Errorf("client AcceptStream = %v, want ErrWrongSide", err)
	}
}

// TestAcceptStreamRules opens raw yamux streams, bypassing OpenStream's
// checks, to play a misbehaving dialer.
func TestAcceptStreamRules(t *testing.T) {
	p := newPKI(t)
	serverCfg := testConfig(p.identity(t, "127.0.0.1"), nil)
	serverCfg.HandshakeTimeout = 200 * time.Millisecond // bounds the kind read
	clientCfg := testConfig(p.identity(t, "client-a.example"), nil)
	tests := []struct {
		name    string
		kinds   []byte // first byte of each stream; empty: none sent
		want    error  // for the last stream; earlier ones must succeed
		timeout bool   // the last stream fails with a timeout
	}{
		{"first stream not control", []byte{byte(KindPages)}, ErrStreamKind, false},
		{"unknown kind", []byte{byte(KindControl), 0x7f}, ErrStreamKind, false},
		{"second control", []byte{byte(KindControl), byte(KindControl)}, ErrStreamKind, false},
		{"no kind byte", nil, nil, true},
		{"good", []byte{byte(KindControl), byte(KindImages)}, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := pair(t, listen(t, serverCfg), clientCfg)
			n := max(len(tt.kinds), 1)
			for i := range n {
				ys, err := client.mux.OpenStream()
				if err != nil {
					t.Fatal(err)
				}
				if i < len(tt.kinds) {
					if _, err := ys.Write(tt.kinds[i : i+1]); err != nil {
						t.Fatal(err)
					}
				}
				_, err = server.AcceptStream(context.Background())
				if i < n-1 || (tt.want == nil && !tt.timeout) {
					if err != nil {
						t.Fatalf("stream %d: %v", i, err)
					}
					continue
				}
				t.Logf("AcceptStream: %v", err)
				if tt.timeout && !isTimeout(err) {
					t.Fatalf("AcceptStream = %v, want a timeout", err)
				}
				if tt.want != nil && !errors.Is(err, tt.want) {
					t.Fatalf("AcceptStream = %v, want %v", err, tt.want)
				}
			}
			// A refused stream leaves the session usable.
			select {
			case <-server.Done():
				t.Error("session ended after a refused stream")
			default:
			}
		})
	}
}

// TestBulkIntegrity sends more than a window's worth through a data stream
// in one Write, which Stream.Write splits into frames, and checks every
// byte.
func TestBulkIntegrity(t *testing.T) {
	p := newPKI(t)
	l := listen(t, testConfig(p.identity(t, "127.0.0.1"), nil))
	client, server := pair(t, l, testConfig(p.identity(t, "client-a.example"), nil))
	ctx := context.Background()
	if _, err := client.OpenStream(ctx, KindControl); err != nil {
		t.Fatal(err)
	}
	if _, err := server.AcceptStream(ctx); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 8<<20+12345)
	rand.Read(data)
	cs, err := client.OpenStream(ctx, KindImages)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := cs.Write(data)
		errc <- errors.Join(err, cs.Close())
	}()
	ss, err := server.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, err := io.Copy(h, ss)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("read %d bytes, %v; want %d", n, err, len(data))
	}
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("data corrupted")
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

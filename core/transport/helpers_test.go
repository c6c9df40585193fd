package transport

import (
	"context"
	"log/slog"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/phaul/phaul/core/pki"
)

// waitLimit bounds every wait for an event in these tests; reaching it is a
// failure, never a pass.
const waitLimit = 20 * time.Second

// testPKI is a CA in a temporary directory.
type testPKI struct {
	ca  *pki.CA
	dir string
}

func newPKI(t testing.TB) *testPKI {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := pki.CreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{ca: ca, dir: dir}
}

// issue writes a tls-dir for hosts and returns its path.
func (p *testPKI) issue(t testing.TB, hosts ...string) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := pki.IssueNode(p.ca, hosts, dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// identity issues a certificate for hosts and loads it.
func (p *testPKI) identity(t testing.TB, hosts ...string) *Identity {
	t.Helper()
	id, err := LoadTLS(p.issue(t, hosts...))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// testConfig is DefaultConfig with id, log and a handshake timeout short
// enough for tests that wait for it.
func testConfig(id *Identity, log *slog.Logger) Config {
	cfg := DefaultConfig()
	cfg.Identity = id
	cfg.Logger = log
	cfg.HandshakeTimeout = 5 * time.Second
	return cfg
}

// listen starts a listener on a loopback port, closed at cleanup.
func listen(t testing.TB, cfg Config) *Listener {
	t.Helper()
	l, err := Listen(context.Background(), "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l
}

// pair dials l with cfg and returns both ends, closed at cleanup.
func pair(t testing.TB, l *Listener, cfg Config) (client, server *Session) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	client, err := Dial(ctx, l.Addr().String(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = l.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}

// logSink is a slog.Handler that hands every record, flattened to strings,
// to a channel, so tests can wait for a log event instead of sleeping.
type logSink struct {
	ch    chan map[string]string
	attrs []slog.Attr
}

func newLogSink() *logSink { return &logSink{ch: make(chan map[string]string, 256)} }

func (h *logSink) logger() *slog.Logger { return slog.New(h) }

func (h *logSink) Enabled(context.Context, slog.Level) bool { return true }

func (h *logSink) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{"msg": r.Message, "level": r.Level.String()}
	for _, a := range h.attrs {
		m[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	select {
	case h.ch <- m:
	default: // a test that logs this much has failed already
	}
	return nil
}

func (h *logSink) WithAttrs(as []slog.Attr) slog.Handler {
	return &logSink{ch: h.ch, attrs: append(slices.Clip(h.attrs), as...)}
}

func (h *logSink) WithGroup(string) slog.Handler { return h }

// wait returns the next record with message msg, skipping others.
func (h *logSink) wait(t testing.TB, msg string) map[string]string {
	t.Helper()
	timeout := time.NewTimer(waitLimit)
	defer timeout.Stop()
	for {
		select {
		case m := <-h.ch:
			if m["msg"] == msg {
				return m
			}
		case <-timeout.C:
			t.Fatalf("no %q log record within %v", msg, waitLimit)
			return nil
		}
	}
}

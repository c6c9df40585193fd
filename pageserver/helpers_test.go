package pageserver

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/pki"
	"github.com/phaul/phaul/core/transport"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// pattern returns n pages whose bytes name their page and seed.
func pattern(nrPages int, seed byte) []byte {
	b := make([]byte, nrPages*PageSize)
	for i := range b {
		b[i] = byte(i/PageSize) ^ seed ^ byte(i*7)
	}
	return b
}

// record is one captured log line.
type record struct {
	msg   string
	level slog.Level
	attrs map[string]any
}

// err returns the record's "err" attribute.
func (r record) err() error {
	e, _ := r.attrs["err"].(error)
	return e
}

// logRecorder is a slog.Handler that keeps every record for assertions
// and also writes it to the test log.
type logRecorder struct {
	t      testing.TB
	mu     sync.Mutex
	recs   []record
	notify chan struct{} // closed and replaced on every record
}

type recHandler struct {
	rec   *logRecorder
	attrs []slog.Attr
}

func newLogRecorder(t testing.TB) (*logRecorder, *slog.Logger) {
	r := &logRecorder{t: t, notify: make(chan struct{})}
	return r, slog.New(&recHandler{rec: r})
}

func (h *recHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *recHandler) Handle(_ context.Context, r slog.Record) error {
	rec := record{msg: r.Message, level: r.Level, attrs: map[string]any{}}
	for _, a := range h.attrs {
		rec.attrs[a.Key] = a.Value.Any()
	}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.Any()
		return true
	})
	h.rec.mu.Lock()
	h.rec.recs = append(h.rec.recs, rec)
	close(h.rec.notify)
	h.rec.notify = make(chan struct{})
	h.rec.mu.Unlock()
	h.rec.t.Logf("log: %s %s %v", r.Level, r.Message, rec.attrs)
	return nil
}

func (h *recHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &recHandler{rec: h.rec, attrs: append(append([]slog.Attr(nil), h.attrs...), as...)}
}

func (h *recHandler) WithGroup(string) slog.Handler { return h }

// wait returns the first record with message msg whose err matches want
// (nil: any), waiting up to 10 s for it.
func (r *logRecorder) wait(msg string, want error) record {
	r.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		for _, rec := range r.recs {
			if rec.msg == msg && (want == nil || errors.Is(rec.err(), want)) {
				r.mu.Unlock()
				return rec
			}
		}
		ch := r.notify
		r.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			r.t.Fatalf("no log record %q with err matching %v", msg, want)
		}
	}
}

// last returns the newest record with message msg.
func (r *logRecorder) last(msg string) record {
	r.t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := len(r.recs) - 1; i >= 0; i-- {
		if r.recs[i].msg == msg {
			return r.recs[i]
		}
	}
	r.t.Fatalf("no log record %q", msg)
	return record{}
}

// waitCount waits up to 10 s until n records have message msg.
func (r *logRecorder) waitCount(msg string, n int) {
	r.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		ch := r.notify
		r.mu.Unlock()
		if r.count(msg) >= n {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			r.t.Fatalf("%d log records %q, want %d", r.count(msg), msg, n)
		}
	}
}

// count returns how many records have message msg.
func (r *logRecorder) count(msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, rec := range r.recs {
		if rec.msg == msg {
			n++
		}
	}
	return n
}

// startServer serves cfg on a loopback listener until the test ends.
func startServer(t testing.TB, cfg Config) (*Server, net.Addr) {
	t.Helper()
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv, ln.Addr()
}

// testConfig returns a server Config on store with a recording logger.
func testConfig(t testing.TB, store Store) (Config, *logRecorder) {
	rec, log := newLogRecorder(t)
	cfg := DefaultConfig()
	cfg.Store, cfg.Logger = store, log
	return cfg, rec
}

// dial connects a Client to addr.
func dial(t testing.TB, addr net.Addr) *Client {
	t.Helper()
	c, err := Dial(context.Background(), addr.String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// rawConn dials addr for hand-made frames; closed at cleanup.
func rawConn(t testing.TB, addr net.Addr) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	return nc
}

// expectClosed reads nc until EOF or reset: the server dropped it.
func expectClosed(t testing.TB, nc net.Conn) {
	t.Helper()
	var b [64]byte
	for {
		_, err := nc.Read(b[:])
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("server did not close the connection")
		}
		return
	}
}

// readImages returns the pagemaps Commit wrote into dir, by file name.
func readImages(t testing.TB, dir string) map[string]*pagestore.Pagemap {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*pagestore.Pagemap{}
	for _, name := range names {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		pm, err := pagestore.ReadPagemap(f)
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out[filepath.Base(name)] = pm
	}
	return out
}

// newStore returns a pagestore for a fresh images dir, closed at cleanup.
func newStore(t testing.TB) (*pagestore.Store, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "images")
	s, err := pagestore.New(pagestore.DefaultConfig(dir))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dir
}

// tlsDirs creates a CA and a node tls-dir for hosts; it returns the node
// dir.
func tlsDirs(t testing.TB, hosts ...string) string {
	t.Helper()
	root := t.TempDir()
	ca, _, err := pki.LoadOrCreateCA(filepath.Join(root, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(root, "node")
	if _, err := pki.IssueNode(ca, hosts, node); err != nil {
		t.Fatal(err)
	}
	return node
}

// clientTLS returns a client config presenting dir's node certificate and
// trusting dir's CA for server name host.
func clientTLS(t testing.TB, dir, host string) *tls.Config {
	t.Helper()
	id, err := transport.LoadTLS(dir)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{id.Cert}, RootCAs: id.Roots, ServerName: host}
}

package pageserver

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/phaul/phaul/core/pagestore"
)

// TestGet serves GETs from the store (spec.md §3.1): runs, short replies,
// pages sent in an earlier session, and a GET for missing pages, which
// drops that connection with a logged reason and leaves the server
// serving.
func TestGet(t *testing.T) {
	store := newMemStore(t)
	cfg, rec := testConfig(t, store)
	_, addr := startServer(t, cfg)

	c := dial(t, addr)
	if _, err := c.Open(keyTask1); err != nil {
		t.Fatal(err)
	}
	data := pattern(8, 5)
	if err := c.Add(keyTask1, vaA, 8, pagestore.FlagPresent, data); err != nil {
		t.Fatal(err)
	}
	long := pattern(600, 6) // a run longer than the server reads at once
	if err := c.Add(keyTask1, vaB+PageSize, 600, pagestore.FlagPresent, long); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	rec.wait("session done", nil)

	// A lazy-pages daemon's session: GET first, no OPEN.
	c = dial(t, addr)
	buf := make([]byte, 16*PageSize)
	for _, tt := range []struct {
		vaddr   uint64
		nrPages int
		want    uint64
	}{
		{vaA, 1, 1},
		{vaA + 3*PageSize, 2, 2},
		{vaA, 8, 8},
		{vaA + 6*PageSize, 16, 2}, // the run ends: a short reply
	} {
		n, err := c.Get(1, tt.vaddr, buf[:tt.nrPages*PageSize])
		off := tt.vaddr - vaA
		if err != nil || n != tt.want || !bytes.Equal(buf[:n*PageSize], data[off:off+n*PageSize]) {
			t.Fatalf("Get(%#x, %d) = %d, %v; want %d pages of the stored data", tt.vaddr, tt.nrPages, n, err, tt.want)
		}
	}
	big := make([]byte, MaxPagesPerIOV*PageSize)
	for _, tt := range []struct {
		skip, nrPages int
		want          uint64
	}{{0, 600, 600}, {0, MaxPagesPerIOV, 600}, {1, 300, 300}, {299, 513, 301}} {
		n, err := c.Get(1, vaB+uint64(1+tt.skip)*PageSize, big[:tt.nrPages*PageSize])
		off := tt.skip * PageSize
		if err != nil || n != tt.want || !bytes.Equal(big[:n*PageSize], long[off:off+int(n)*PageSize]) {
			t.Fatalf("Get(page %d of the long run, %d) = %d, %v; want %d pages", tt.skip, tt.nrPages, n, err, tt.want)
		}
	}
	if _, err := c.Get(1, vaB, buf[:PageSize]); err == nil {
		t.Fatal("Get of a page never stored succeeded")
	}
	r := rec.wait("session failed", ErrNotFound)
	if !errors.Is(r.err(), pagestore.ErrNotFound) {
		t.Errorf("logged %v, want the store's ErrNotFound inside", r.err())
	}
	c.Abort()
	if _, err := c.Get(1, vaA, buf[:PageSize]); err == nil {
		t.Fatal("the dropped connection still answers")
	}

	c = dial(t, addr)
	if n, err := c.Get(1, vaA+7*PageSize, buf[:PageSize]); err != nil || n != 1 {
		t.Fatalf("Get after the dropped session: %d, %v", n, err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, commits := store.counts(); commits != 1 {
		t.Fatalf("%d commits; GET-only sessions must not commit", commits)
	}
}

// TestCommitFailure: a store that cannot commit makes CLOSE reply -1, so
// CRIU's dump fails instead of losing the pages silently.
func TestCommitFailure(t *testing.T) {
	store := newMemStore(t)
	store.commitErr = errors.New("disk full")
	cfg, rec := testConfig(t, store)
	_, addr := startServer(t, cfg)
	c := dial(t, addr)
	if _, err := c.Open(keyTask1); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); !errors.Is(err, ErrStatus) {
		t.Fatalf("Close = %v, want ErrStatus", err)
	}
	rec.wait("session failed", nil)
}

// TestForceClose: FORCE_CLOSE commits and replies like CLOSE, and the
// server does not wait for the client to hang up.
func TestForceClose(t *testing.T) {
	store := newMemStore(t)
	cfg, rec := testConfig(t, store)
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer b.Close()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), a) }()
	mustWrite(t, b, appendHeader(appendHeader(nil, header{cmd: CmdOpen, dstID: task1}), header{cmd: CmdForceClose}))
	if got := readN(t, b, 4); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
		t.Fatalf("FORCE_CLOSE reply %x", got)
	}
	if err := <-done; err != nil { // b is still open
		t.Fatalf("ServeConn: %v", err)
	}
	if _, commits := store.counts(); commits != 1 {
		t.Fatalf("%d commits, want 1", commits)
	}
	rec.wait("session done", nil)
}

func mustWrite(t testing.TB, w io.Writer, b []byte) {
	t.Helper()
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
}

func readN(t testing.TB, r io.Reader, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// TestTimeouts: a peer that never sends its first header is dropped after
// HandshakeTimeout without holding the session slot; a session whose peer
// stalls is dropped after IdleTimeout; beyond maxPending silent
// connections, new ones are closed at once.
func TestTimeouts(t *testing.T) {
	store := newMemStore(t)
	cfg, rec := testConfig(t, store)
	cfg.HandshakeTimeout, cfg.IdleTimeout = 300*time.Millisecond, 300*time.Millisecond
	_, addr := startServer(t, cfg)

	silent := rawConn(t, addr)
	c := dial(t, addr) // served while silent waits
	if _, err := c.Open(keyTask1); err != nil {
		t.Fatalf("a silent connection blocks the session: %v", err)
	}
	expectClosed(t, silent)
	if r := rec.wait("connection refused", nil); !isTimeout(r.err()) {
		t.Errorf("silent peer dropped with %v, want a timeout", r.err())
	}
	// c now stalls.
	if r := rec.wait("session failed", nil); !isTimeout(r.err()) {
		t.Errorf("stalled session dropped with %v, want a timeout", r.err())
	}
	c.Abort()

	cfg.HandshakeTimeout = time.Minute
	rec2, log := newLogRecorder(t)
	cfg.Logger = log
	_, addr = startServer(t, cfg)
	var held []net.Conn
	for range maxPending {
		held = append(held, rawConn(t, addr))
	}
	extra := rawConn(t, addr)
	expectClosed(t, extra)
	if r := rec2.wait("connection refused", ErrBusy); r.attrs["stage"] != "pending" {
		t.Errorf("refused at stage %v, want pending", r.attrs["stage"])
	}
	for _, nc := range held {
		nc.Close()
	}
	rec2.waitCount("connection refused", 1+maxPending) // each gave its token back
	c = dial(t, addr)
	if _, err := c.Open(keyTask1); err != nil {
		t.Fatalf("after the silent connections left: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestClientChecks: the Client refuses to send what spec.md forbids, so a
// forwarder built on it cannot get its session dropped by a peer.
func TestClientChecks(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	c := NewClient(b)
	defer c.Abort()
	for name, err := range map[string]error{
		"task 0":             func() error { _, err := c.Open(pagestore.Key{Kind: pagestore.KindTask}); return err }(),
		"unknown kind":       func() error { _, err := c.Parent(pagestore.Key{Kind: 9, ID: 1}); return err }(),
		"short data":         c.Add(keyTask1, vaA, 2, pagestore.FlagPresent, pattern(1, 0)),
		"data without flag":  c.Add(keyTask1, vaA, 1, pagestore.FlagLazy, pattern(1, 0)),
		"flags parent|lazy":  c.Add(keyTask1, vaA, 1, pagestore.FlagParent|pagestore.FlagLazy, nil),
		"flags above 16 bit": c.Add(keyTask1, vaA, 1, 1<<16|pagestore.FlagLazy, nil),
		"unaligned":          c.Add(keyTask1, vaA+1, 1, pagestore.FlagLazy, nil),
		"get partial page":   func() error { _, err := c.Get(1, vaA, make([]byte, 100)); return err }(),
		"get too much":       func() error { _, err := c.Get(1, vaA, make([]byte, (MaxPagesPerIOV+1)*PageSize)); return err }(),
	} {
		if err == nil {
			t.Errorf("%s: sent", name)
		}
	}
}

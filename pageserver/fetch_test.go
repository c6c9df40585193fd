package pageserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// pattern fills buf as task id's pages at vaddr read: each 8-byte word
// names its task and address.
func fetchPattern(id, vaddr uint64, buf []byte) {
	for i := 0; i+8 <= len(buf); i += 8 {
		binary.LittleEndian.PutUint64(buf[i:], id<<48^(vaddr+uint64(i)))
	}
}

// fetchPair serves read on one end of a pipe and returns a client on the
// other.
func fetchPair(t *testing.T, read PageReader) (*FetchClient, *FetchServeStats, chan error) {
	t.Helper()
	a, b := net.Pipe()
	st := &FetchServeStats{}
	served := make(chan error, 1)
	go func() { served <- ServeFetch(b, read, st); b.Close() }()
	c := NewFetchClient(a)
	t.Cleanup(func() { c.Close() })
	return c, st, served
}

func TestFetchPipelined(t *testing.T) {
	c, st, _ := fetchPair(t, func(id, vaddr uint64, buf []byte) error { fetchPattern(id, vaddr, buf); return nil })
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20 {
				// Sizes from one page to past MaxFetchPages (split).
				n := 1 + (g*37+i*101)%(MaxFetchPages+300)
				if i != 0 {
					n = 1 + n%16
				}
				vaddr := uint64(0x7f0000000000 + (g*1000+i)*PageSize)
				buf := make([]byte, n*PageSize)
				if err := c.Fetch(context.Background(), uint64(g), vaddr, buf); err != nil {
					errs <- err
					return
				}
				want := make([]byte, len(buf))
				fetchPattern(uint64(g), vaddr, want)
				if !bytes.Equal(buf, want) {
					errs <- fmt.Errorf("task %d: %d pages at %#x: wrong content", g, n, vaddr)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := len(c.Latencies()); uint64(got) != st.Requests.Load() || got < 16*20 {
		t.Errorf("%d latencies for %d requests (want ≥ %d)", got, st.Requests.Load(), 16*20)
	}
}

func TestFetchRefused(t *testing.T) {
	c, st, _ := fetchPair(t, func(id, vaddr uint64, buf []byte) error {
		if vaddr == 0x2000 {
			return errors.New("not a lazy page of the final set")
		}
		fetchPattern(id, vaddr, buf)
		return nil
	})
	buf := make([]byte, PageSize)
	err := c.Fetch(context.Background(), 1, 0x2000, buf)
	if !errors.Is(err, ErrRefused) || !bytes.Contains([]byte(err.Error()), []byte("not a lazy page")) {
		t.Fatalf("Fetch of a refused page = %v, want ErrRefused with the reason", err)
	}
	// A refusal ends nothing: the stream goes on.
	if err := c.Fetch(context.Background(), 1, 0x3000, buf); err != nil {
		t.Fatalf("Fetch after a refusal: %v", err)
	}
	if st.Refused.Load() != 1 || st.Pages.Load() != 1 {
		t.Errorf("refused %d pages %d, want 1 and 1", st.Refused.Load(), st.Pages.Load())
	}
}

func TestFetchCancel(t *testing.T) {
	release := make(chan struct{})
	c, _, _ := fetchPair(t, func(id, vaddr uint64, buf []byte) error { <-release; return nil })
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := c.Fetch(ctx, 1, 0, make([]byte, PageSize))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Fetch with a stuck source = %v, want the deadline", err)
	}
	// Closed: later fetches fail at once.
	if err := c.Fetch(context.Background(), 1, 0, make([]byte, PageSize)); err == nil {
		t.Fatal("Fetch after the client closed succeeded")
	}
}

func TestFetchPreface(t *testing.T) {
	var b bytes.Buffer
	if err := WriteFetchPreface(&b, FetchFill); err != nil {
		t.Fatal(err)
	}
	good := b.Bytes()
	if role, err := ReadFetchPreface(bytes.NewReader(good)); err != nil || role != FetchFill {
		t.Fatalf("ReadFetchPreface = %v, %v", role, err)
	}
	for i := range good {
		bad := bytes.Clone(good)
		bad[i] ^= 0x40
		if _, err := ReadFetchPreface(bytes.NewReader(bad)); !errors.Is(err, ErrFetch) {
			t.Errorf("byte %d flipped: %v, want ErrFetch", i, err)
		}
	}
	if _, err := ReadFetchPreface(bytes.NewReader(good[:5])); err == nil || errors.Is(err, ErrFetch) {
		t.Errorf("short preface: %v, want a read error", err)
	}
}

// TestServeFetchRejects feeds the server bad requests.
func TestServeFetchRejects(t *testing.T) {
	req := func(mod func(b []byte)) []byte {
		b := make([]byte, fetchHeaderSize)
		fetchHeader{typ: fetchRequest, count: 1, id: 1, vaddr: 0x1000, seq: 1}.encode(b)
		mod(b)
		return b
	}
	tests := map[string][]byte{
		"version":     req(func(b []byte) { b[0] = 2 }),
		"reserved":    req(func(b []byte) { b[3] = 1 }),
		"type":        req(func(b []byte) { b[1] = fetchPages }),
		"zero pages":  req(func(b []byte) { binary.BigEndian.PutUint32(b[4:], 0) }),
		"too many":    req(func(b []byte) { binary.BigEndian.PutUint32(b[4:], MaxFetchPages+1) }),
		"unaligned":   req(func(b []byte) { binary.BigEndian.PutUint64(b[16:], 0x1001) }),
		"wraps":       req(func(b []byte) { binary.BigEndian.PutUint64(b[16:], ^uint64(0)-PageSize+1) }),
		"seq skipped": req(func(b []byte) { binary.BigEndian.PutUint64(b[24:], 2) }),
	}
	for name, b := range tests {
		t.Run(name, func(t *testing.T) {
			rw := &rwBuf{r: bytes.NewReader(b)}
			called := false
			err := ServeFetch(rw, func(id, vaddr uint64, buf []byte) error { called = true; return nil }, &FetchServeStats{})
			if !errors.Is(err, ErrFetch) || called || rw.w.Len() != 0 {
				t.Fatalf("ServeFetch = %v (read called %v, %d bytes answered), want ErrFetch and nothing read", err, called, rw.w.Len())
			}
		})
	}
}

type rwBuf struct {
	r io.Reader
	w bytes.Buffer
}

func (b *rwBuf) Read(p []byte) (int, error)  { return b.r.Read(p) }
func (b *rwBuf) Write(p []byte) (int, error) { return b.w.Write(p) }
func (b *rwBuf) Close() error                { return nil }

// FuzzFetchAnswers plays a source answering one request of 2 pages with
// arbitrary bytes: the client must fail cleanly (ErrFetch, ErrRefused or
// a read error), never write past its buffer, never hang.
func FuzzFetchAnswers(f *testing.F) {
	good := make([]byte, fetchHeaderSize+2*PageSize)
	fetchHeader{typ: fetchPages, count: 2 * PageSize, id: 7, vaddr: 0x5000, seq: 1}.encode(good)
	f.Add(good)
	refused := make([]byte, fetchHeaderSize, fetchHeaderSize+4)
	fetchHeader{typ: fetchRefused, count: 4, id: 7, vaddr: 0x5000, seq: 1}.encode(refused)
	f.Add(append(refused, "gone"...))
	f.Add(good[:40])
	f.Fuzz(func(t *testing.T, data []byte) {
		rw := &rwBuf{r: bytes.NewReader(data)}
		c := NewFetchClient(rw)
		buf := make([]byte, 3*PageSize)
		err := c.Fetch(context.Background(), 7, 0x5000, buf[:2*PageSize])
		c.Close()
		if err == nil && !bytes.Equal(data[:fetchHeaderSize], good[:fetchHeaderSize]) {
			t.Fatalf("accepted an answer with header %x", data[:fetchHeaderSize])
		}
		if !bytes.Equal(buf[2*PageSize:], make([]byte, PageSize)) {
			t.Fatal("wrote past the buffer")
		}
	})
}

// FuzzServeFetch feeds the server arbitrary requests: it answers only
// well-formed ones, reads only what they ask, never more than asked.
func FuzzServeFetch(f *testing.F) {
	b := make([]byte, fetchHeaderSize)
	fetchHeader{typ: fetchRequest, count: 3, id: 1, vaddr: 0x1000, seq: 1}.encode(b)
	f.Add(b)
	f.Add(append(bytes.Clone(b), b...))
	f.Fuzz(func(t *testing.T, data []byte) {
		rw := &rwBuf{r: bytes.NewReader(data)}
		var asked uint64
		err := ServeFetch(rw, func(id, vaddr uint64, buf []byte) error {
			if len(buf) == 0 || len(buf) > MaxFetchPages*PageSize || vaddr%PageSize != 0 {
				t.Fatalf("read of %d bytes at %#x", len(buf), vaddr)
			}
			asked += uint64(len(buf))
			return nil
		}, &FetchServeStats{})
		if err != nil && !errors.Is(err, ErrFetch) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("ServeFetch = %v", err)
		}
		if answered := uint64(rw.w.Len()); answered < asked {
			t.Fatalf("answered %d bytes for %d read", answered, asked)
		}
	})
}

// TestFetchRecover cuts the stream with requests in flight: they wait and
// are asked again on the stream Attach hands over, which answers them.
func TestFetchRecover(t *testing.T) {
	read := func(id, vaddr uint64, buf []byte) error { fetchPattern(id, vaddr, buf); return nil }
	a, b := net.Pipe()
	stuck := make(chan struct{})
	go ServeFetch(b, func(id, vaddr uint64, buf []byte) error { <-stuck; return errors.New("cut") }, &FetchServeStats{})
	c := NewFetchClient(a)
	defer c.Close()
	c.SetRecoverTimeout(10 * time.Second)
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			buf := make([]byte, (i+1)*PageSize)
			vaddr := uint64(0x10000 * (i + 1))
			err := c.Fetch(context.Background(), 3, vaddr, buf)
			want := make([]byte, len(buf))
			fetchPattern(3, vaddr, want)
			if err == nil && !bytes.Equal(buf, want) {
				err = fmt.Errorf("fetch %d: wrong content", i)
			}
			errs <- err
		}()
	}
	time.Sleep(50 * time.Millisecond) // the requests go out
	b.Close()                         // the cut
	close(stuck)
	testenvWait(t, func() bool { return !c.Lost().IsZero() })
	a2, b2 := net.Pipe()
	go ServeFetch(b2, read, &FetchServeStats{})
	if err := c.Attach(a2); err != nil {
		t.Fatal(err)
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if !c.Lost().IsZero() {
		t.Error("still lost after Attach")
	}
}

// TestFetchRecoverTimeout: without a new stream the requests in flight
// fail once the recover timeout passes, and not before.
func TestFetchRecoverTimeout(t *testing.T) {
	a, b := net.Pipe()
	release := make(chan struct{})
	defer close(release)
	go ServeFetch(b, func(id, vaddr uint64, buf []byte) error { <-release; return nil }, &FetchServeStats{})
	c := NewFetchClient(a)
	defer c.Close()
	c.SetRecoverTimeout(300 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- c.Fetch(context.Background(), 1, 0, make([]byte, PageSize)) }()
	time.Sleep(50 * time.Millisecond)
	t0 := time.Now()
	b.Close()
	err := <-done
	if err == nil || time.Since(t0) < 250*time.Millisecond {
		t.Fatalf("Fetch after a cut = %v after %v; want a failure after the 300ms recover timeout", err, time.Since(t0))
	}
	if err := c.Attach(nopRWC{}); err == nil {
		t.Fatal("Attach after the client failed succeeded")
	}
}

type nopRWC struct{}

func (nopRWC) Read([]byte) (int, error)    { return 0, io.EOF }
func (nopRWC) Write(p []byte) (int, error) { return len(p), nil }
func (nopRWC) Close() error                { return nil }

func testenvWait(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestLostFetchClient: a client made without a stream queues its requests
// until the first Attach, and fails them if none comes within its grace.
func TestLostFetchClient(t *testing.T) {
	c := NewLostFetchClient(10 * time.Second)
	defer c.Close()
	done := make(chan error, 1)
	buf := make([]byte, 3*PageSize)
	go func() { done <- c.Fetch(context.Background(), 5, 0x20000, buf) }()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("Fetch without a stream returned %v", err)
	default:
	}
	a, b := net.Pipe()
	go ServeFetch(b, func(id, vaddr uint64, buf []byte) error { fetchPattern(id, vaddr, buf); return nil }, &FetchServeStats{})
	if err := c.Attach(a); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, len(buf))
	fetchPattern(5, 0x20000, want)
	if err := <-done; err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("Fetch after Attach: %v (content ok: %v)", err, bytes.Equal(buf, want))
	}

	never := NewLostFetchClient(200 * time.Millisecond)
	defer never.Close()
	t0 := time.Now()
	if err := never.Fetch(context.Background(), 1, 0, make([]byte, PageSize)); err == nil || time.Since(t0) < 150*time.Millisecond {
		t.Fatalf("Fetch with no stream ever = %v after %v; want a failure after the grace", err, time.Since(t0))
	}
}

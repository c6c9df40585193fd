package pageserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/phaul/phaul/core/pagestore"
)

// duplex joins a reader and a writer into the ReadWriter a stream is.
type duplex struct {
	io.Reader
	io.Writer
}

// forwardPair connects a Forwarder to ReceiveLanes over lanes pipes and
// returns the forwarder and a function that waits for the receiver's
// result.
func forwardPair(t *testing.T, cfg ForwardConfig, store ReceiveStore, lanes int) (*Forwarder, func() (ForwardStats, error)) {
	t.Helper()
	var src, dst []io.ReadWriter
	for range lanes {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		src, dst = append(src, a), append(dst, b)
	}
	f, err := NewForwarder(cfg, src...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	type res struct {
		st  ForwardStats
		err error
	}
	done := make(chan res, 1)
	go func() {
		ordered := make([]io.ReadWriter, lanes)
		for _, rw := range dst {
			idx, n, err := ReadLane(rw)
			if err == nil && (n != lanes || ordered[idx] != nil) {
				err = fmt.Errorf("lane %d of %d", idx, n)
			}
			if err != nil {
				done <- res{err: err}
				return
			}
			ordered[idx] = rw
		}
		st, err := ReceiveLanes(store, ordered...)
		if err != nil {
			// As the destination does: a failed receiver closes its
			// streams, and the sender's writes fail instead of blocking.
			for _, rw := range dst {
				rw.(net.Conn).Close()
			}
		}
		done <- res{st, err}
	}()
	return f, func() (ForwardStats, error) { r := <-done; return r.st, r.err }
}

func testPages(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n*pagestore.PageSize)
	for i := 0; i < n; i++ {
		p := b[i*pagestore.PageSize : (i+1)*pagestore.PageSize]
		switch i % 4 {
		case 0: // random
			for j := range p {
				p[j] = byte(r.Uint32())
			}
		case 1: // zero
		case 2: // compressible text-like
			for j := range p {
				p[j] = "phaul page "[j%11]
			}
			p[0] = byte(i)
		case 3: // duplicate of page 0 of this run
			copy(p, b[:pagestore.PageSize])
		}
	}
	return b
}

func TestForwardRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		mode  string
		lanes int
	}{{"off", 1}, {"on", 1}, {"auto", 1}, {"off", 3}, {"on", 3}, {"on", 2}} {
		mode := tc.mode
		t.Run(fmt.Sprintf("%s/%d-lanes", tc.mode, tc.lanes), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "images")
			store, err := pagestore.New(pagestore.DefaultConfig(dir))
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			f, wait := forwardPair(t, ForwardConfig{Compress: mode}, store, tc.lanes)
			k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
			// 2400 pages: several batches, spread over the lanes.
			const n = 2400
			data := testPages(n, 7)
			if _, err := f.Open(k); err != nil {
				t.Fatal(err)
			}
			const base = 0x7f0000000000
			if err := f.Add(k, base, n, pagestore.FlagPresent, data); err != nil {
				t.Fatal(err)
			}
			if err := f.Add(k, base+(n+100)*pagestore.PageSize, 3, pagestore.FlagLazy, nil); err != nil {
				t.Fatal(err)
			}
			if err := f.Commit(); err != nil {
				t.Fatal(err)
			}
			got, err := wait()
			if err != nil {
				t.Fatal(err)
			}
			sent := f.Stats()
			distinct := map[string]bool{}
			for i := 0; i < n; i++ {
				if p := data[i*pagestore.PageSize : (i+1)*pagestore.PageSize]; !isZero(p) {
					distinct[string(p)] = true
				}
			}
			if got.Pages != n || got.ZeroPages != n/4 || got.DataPages != uint64(len(distinct)) ||
				got.DupPages != 3*n/4-uint64(len(distinct)) || got.Entries != 1 {
				t.Fatalf("received %+v; want %d zero, %d distinct", got, n/4, len(distinct))
			}
			if len(sent.Lanes) != tc.lanes || len(got.Lanes) != tc.lanes {
				t.Fatalf("lanes: sent on %d, received on %d, want %d", len(sent.Lanes), len(got.Lanes), tc.lanes)
			}
			for i := range sent.Lanes {
				if sent.Lanes[i].Batches == 0 || sent.Lanes[i] != got.Lanes[i] {
					t.Fatalf("lane %d: sent %+v, received %+v", i, sent.Lanes[i], got.Lanes[i])
				}
			}
			if sent.Pages != got.Pages || sent.DupPages != got.DupPages || sent.WireBytes != got.WireBytes {
				t.Fatalf("sent %+v, received %+v", sent, got)
			}
			if mode == "on" && sent.Compressed == 0 {
				t.Fatal("compress on: no frame compressed")
			}
			if mode == "off" && sent.Compressed != 0 {
				t.Fatal("compress off: frames compressed")
			}
			back := make([]byte, len(data))
			if err := store.Read(k, base, back); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(back, data) {
				t.Fatal("pages read back differ")
			}
			// Zero and duplicate pages cost (almost) nothing on the wire.
			if sent.WireBytes > uint64(len(data))*6/10 {
				t.Fatalf("%d wire bytes for %d bytes of pages", sent.WireBytes, len(data))
			}
		})
	}
}

// memReceive is a ReceiveStore that records calls, for bad-input tests.
type memReceive struct{ *memStore }

func (m memReceive) AddZero(k pagestore.Key, vaddr, n uint64) error {
	if n > MaxPagesPerIOV {
		return pagestore.ErrLimit // the fake holds pages in memory
	}
	return m.Add(k, vaddr, n, pagestore.FlagPresent, make([]byte, n*pagestore.PageSize))
}

// frame is one frame with its payload, length set from it.
func frame(h fwdHeader, payload []byte) []byte {
	h.length = uint32(len(payload))
	return append(h.append(nil), payload...)
}

// batchOf is batch seq holding frames, raw or zstd.
func batchOf(seq uint64, compress bool, frames ...[]byte) []byte {
	raw := slices.Concat(frames...)
	if compress {
		return frame(fwdHeader{typ: fwdBatch, enc: encZstd, id: seq}, zstdOf(raw))
	}
	return frame(fwdHeader{typ: fwdBatch, id: seq}, raw)
}

// BeginFinal and Keep, as pagestore.Store does them: Keep names pages
// recorded before, after BeginFinal.
func (m memReceive) BeginFinal() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.final = true
	return nil
}

func (m memReceive) Keep(k pagestore.Key, vaddr, n uint64) error {
	m.mu.Lock()
	final := m.final
	m.mu.Unlock()
	if !final {
		return pagestore.ErrInvalid
	}
	if n > MaxPagesPerIOV {
		return pagestore.ErrLimit
	}
	return m.Read(k, vaddr, make([]byte, n*pagestore.PageSize))
}

func TestReceiveBadInput(t *testing.T) {
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	lane := fwdHeader{typ: fwdLane, nrPages: 1}.append(nil)
	open := fwdHeader{typ: fwdOpen, kind: k.Kind, id: k.ID}.append(nil)
	page := bytes.Repeat([]byte{1}, pagestore.PageSize)
	pages := func(vaddr, n uint64, payload []byte) []byte {
		return frame(fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, vaddr: vaddr, nrPages: n}, payload)
	}
	on := func(frames ...[]byte) []byte { return slices.Concat(append([][]byte{lane}, frames...)...) }
	withReserved := fwdHeader{typ: fwdOpen}.append(nil)
	withReserved[39] = 1
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.ErrUnexpectedEOF},
		{"no lane frame", open, ErrForward},
		{"lane 1 of 2", fwdHeader{typ: fwdLane, id: 1, nrPages: 2}.append(nil), ErrForward},
		{"no lanes", fwdHeader{typ: fwdLane}.append(nil), ErrForward},
		{"too many lanes", fwdHeader{typ: fwdLane, nrPages: MaxLanes + 1}.append(nil), ErrForward},
		{"bad version", on(append([]byte{9}, make([]byte, fwdHeaderLen-1)...)), ErrForward},
		{"reserved", on(withReserved), ErrForward},
		{"unknown type", on(fwdHeader{typ: 99}.append(nil)), ErrForward},
		{"frame outside a batch", on(open), ErrForward},
		{"huge batch", on(fwdHeader{typ: fwdBatch, length: fwdMaxBatch + 1}.append(nil)), ErrForward},
		{"stops mid-batch", on(fwdHeader{typ: fwdBatch, length: 100}.append(nil), open), io.ErrUnexpectedEOF},
		{"no end", on(batchOf(0, false, open)), io.ErrUnexpectedEOF},
		{"batch out of order", on(batchOf(1, false, open)), ErrForward},
		{"batch repeated", on(batchOf(0, false, open), batchOf(0, false, open)), ErrForward},
		{"too many pages", on(batchOf(0, false, open, frame(fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, nrPages: fwdMaxPages + 1}, nil))), ErrForward},
		{"zstd pages frame", on(batchOf(0, false, open, frame(fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1, enc: encZstd}, page))), ErrForward},
		{"unknown encoding", on(frame(fwdHeader{typ: fwdBatch, enc: 7}, open)), ErrForward},
		{"bad zstd batch", on(frame(fwdHeader{typ: fwdBatch, enc: encZstd}, []byte("not zstd"))), ErrForward},
		{"empty batch", on(frame(fwdHeader{typ: fwdBatch, enc: encZstd}, nil)), ErrForward},
		{"batch with a range", on(frame(fwdHeader{typ: fwdBatch, enc: encZstd, nrPages: 1}, zstdOf(open))), ErrForward},
		{"batch holds an end", on(batchOf(0, true, open, frame(fwdHeader{typ: fwdEnd}, nil))), ErrForward},
		{"batch holds a batch", on(batchOf(0, true, batchOf(1, true, open))), ErrForward},
		{"batch holds a lane frame", on(batchOf(0, false, lane)), ErrForward},
		{"batch cuts a header", on(batchOf(0, true, open[:20])), ErrForward},
		{"batch cuts a payload", on(batchOf(0, true, open,
			fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 2, length: 2 * pagestore.PageSize}.append(nil), page)), ErrForward},
		{"short pages payload", on(batchOf(0, false, open, frame(fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 2}, page))), ErrForward},
		{"pages before open", on(batchOf(0, true, pages(0x1000, 1, page))), ErrForward},
		{"batch decodes too big", on(frame(fwdHeader{typ: fwdBatch, enc: encZstd}, zstdOf(make([]byte, fwdMaxBatch+1)))), ErrForward},
		{"dup of nothing", on(batchOf(0, false, open, frame(fwdHeader{typ: fwdDup, kind: k.Kind, id: k.ID, nrPages: 1}, dupOf(k, 0x1000)))), ErrForward},
		{"bad kind", on(batchOf(0, false, fwdHeader{typ: fwdOpen, kind: 48, id: 1}.append(nil))), ErrForward},
		{"task id 0", on(batchOf(0, false, fwdHeader{typ: fwdOpen, kind: k.Kind}.append(nil))), ErrForward},
		{"zero range wraps", on(batchOf(0, false, open, fwdHeader{typ: fwdZero, kind: k.Kind, id: k.ID, vaddr: 1 << 56, nrPages: 1 << 62}.append(nil))), ErrForward},
		{"unaligned", on(batchOf(0, false, open, fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: 5, nrPages: 1, flags: pagestore.FlagLazy}.append(nil))), ErrForward},
		{"entry flags", on(batchOf(0, false, open, fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1, flags: 0x6502}.append(nil))), ErrForward},
		{"entry present", on(batchOf(0, false, open, fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1, flags: pagestore.FlagPresent}.append(nil))), ErrForward},
		{"parent without parent", on(batchOf(0, false, open, fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1, flags: pagestore.FlagParent}.append(nil))), ErrForward},
		{"flags on pages", on(batchOf(0, false, open, frame(fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1, flags: 4}, page))), ErrForward},
		{"final with a key", on(batchOf(0, false, fwdHeader{typ: fwdFinal, kind: k.Kind, id: k.ID}.append(nil))), ErrForward},
		{"keep before open", on(batchOf(0, false, fwdHeader{typ: fwdFinal}.append(nil), fwdHeader{typ: fwdKeep, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1}.append(nil))), ErrForward},
		{"keep before final", on(batchOf(0, false, open, pages(0x1000, 1, page), fwdHeader{typ: fwdKeep, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1}.append(nil))), pagestore.ErrInvalid},
		{"keep of nothing", on(batchOf(0, false, open, fwdHeader{typ: fwdFinal}.append(nil), fwdHeader{typ: fwdKeep, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1}.append(nil))), pagestore.ErrNotFound},
		{"keep with a payload", on(batchOf(0, false, open, fwdHeader{typ: fwdFinal}.append(nil), frame(fwdHeader{typ: fwdKeep, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1}, page))), ErrForward},
		{"end pages wrong", on(batchOf(0, false, open, pages(0x1000, 1, page)), fwdHeader{typ: fwdEnd, nrPages: 5, vaddr: 1}.append(nil)), ErrForward},
		{"end batches wrong", on(batchOf(0, false, open, pages(0x1000, 1, page)), fwdHeader{typ: fwdEnd, nrPages: 1, vaddr: 2}.append(nil)), ErrForward},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := memReceive{newMemStore(t)}
			var out bytes.Buffer
			_, err := Receive(duplex{bytes.NewReader(tt.in), &out}, store)
			t.Logf("%v", err)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Receive = %v, want %v", err, tt.want)
			}
			if _, commits := store.counts(); commits != 0 {
				t.Fatal("a bad stream was committed")
			}
		})
	}
}

// TestReceiveLanesBadInput: lanes that disagree fail the session instead
// of waiting for each other forever.
func TestReceiveLanesBadInput(t *testing.T) {
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	open := fwdHeader{typ: fwdOpen, kind: k.Kind, id: k.ID}.append(nil)
	entry := func(vaddr uint64) []byte {
		return fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: vaddr, nrPages: 1, flags: pagestore.FlagLazy}.append(nil)
	}
	end := func(batches uint64) []byte { return fwdHeader{typ: fwdEnd, vaddr: batches}.append(nil) }
	tests := []struct {
		name  string
		lanes [][]byte
		want  error
	}{
		{"good", [][]byte{
			slices.Concat(batchOf(0, false, open), batchOf(2, true, entry(0x3000)), end(4)),
			slices.Concat(batchOf(1, true, entry(0x1000)), batchOf(3, false, entry(0x4000)), end(4)),
		}, nil},
		{"lane ends owing a batch", [][]byte{
			slices.Concat(batchOf(0, false, open), end(4)),
			slices.Concat(batchOf(1, false, entry(0x1000)), batchOf(3, false, entry(0x4000)), end(4)),
		}, ErrForward},
		{"batch on the wrong lane", [][]byte{
			slices.Concat(batchOf(0, false, open), batchOf(1, false, entry(0x1000)), end(2)),
			end(2),
		}, ErrForward},
		{"ends disagree", [][]byte{
			slices.Concat(batchOf(0, false, open), end(2)),
			slices.Concat(batchOf(1, false, entry(0x1000)), end(3)),
		}, ErrForward},
		{"lane cut", [][]byte{
			slices.Concat(batchOf(0, false, open), end(2)),
			batchOf(1, false, entry(0x1000))[:50],
		}, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := memReceive{newMemStore(t)}
			var lanes []io.ReadWriter
			for _, in := range tt.lanes {
				lanes = append(lanes, duplex{bytes.NewReader(in), io.Discard})
			}
			done := make(chan error, 1)
			go func() {
				_, err := ReceiveLanes(store, lanes...)
				done <- err
			}()
			select {
			case err := <-done:
				t.Logf("%v", err)
				if !errors.Is(err, tt.want) {
					t.Fatalf("ReceiveLanes = %v, want %v", err, tt.want)
				}
				if _, commits := store.counts(); (commits != 0) != (tt.want == nil) {
					t.Fatalf("%d commits", commits)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("ReceiveLanes hangs")
			}
		})
	}
}

func FuzzReceive(f *testing.F) {
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	for _, mode := range []string{"on", "off"} {
		var good bytes.Buffer
		fw, err := NewForwarder(ForwardConfig{Compress: mode}, duplex{bytes.NewReader(nil), &good})
		if err != nil {
			f.Fatal(err)
		}
		fw.Open(k)
		fw.Add(k, 0x10000, 8, pagestore.FlagPresent, testPages(8, 1))
		fw.Add(k, 0x20000, 2, pagestore.FlagLazy, nil)
		fw.Commit() // no ack to read: fails after writing the stream
		fw.Close()
		f.Add(good.Bytes())
	}
	f.Add(fwdHeader{typ: fwdBatch, nrPages: 1, length: 1 << 31}.append(nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		store := memReceive{newMemStore(t)}
		var out bytes.Buffer
		Receive(duplex{bytes.NewReader(in), &out}, store) // must not panic or allocate unboundedly
	})
}

// zstdOf compresses b as the forwarder does.
func zstdOf(b []byte) []byte {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		panic(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

// dupOf is a dup payload naming a page of k that was never sent.
func dupOf(k pagestore.Key, vaddr uint64) []byte {
	p := make([]byte, fwdDupLen)
	p[16] = byte(k.Kind)
	binary.BigEndian.PutUint64(p[24:], k.ID)
	binary.BigEndian.PutUint64(p[32:], vaddr)
	return p
}

// simLink drives a compressPolicy the way a Forwarder does, over a
// simulated link: a buffer of buf bytes drained at linkRate (a write blocks
// until its bytes fit), a compressor of compRate raw bytes per second with
// the ratio the data at each offset has, running ahead of the writer by up
// to two batches (the Forwarder's spare buffers), and a source that hands
// 1 MiB batches as fast as they are taken.
type simLink struct {
	linkRate, compRate float64 // bytes per second
	buf                float64 // bytes the link buffers
	ratio              func(off uint64) float64
}

// run sends total raw bytes and returns the wire bytes, the time taken and
// the fraction of batches sent compressed in each quarter.
func (l simLink) run(p *compressPolicy, total uint64) (wire float64, secs float64, quarters [4]float64) {
	const batch = 1 << 20
	var prod, writer, last, queued float64 // producer and writer clocks
	var written []float64                  // when each batch's write ended
	var frames [4]int
	for off := uint64(0); off < total; off += batch {
		if i := len(written); i >= 2 {
			prod = max(prod, written[i-2]) // no spare buffer before that
		}
		n := float64(batch)
		compressed := false
		if p.shouldCompress(batch) {
			d := n / l.compRate
			prod += d
			z := n * l.ratio(off)
			p.compressed(batch, int(z), time.Duration(d*1e9))
			if z < n {
				n, compressed = z, true
			}
		}
		// The writer takes it when both are ready; the link drained
		// meanwhile; then it waits for room.
		start := max(prod, writer)
		queued = max(0, queued-(start-last)*l.linkRate)
		wait := max(0, queued+n-l.buf) / l.linkRate
		writer = start + wait
		queued = max(0, queued-wait*l.linkRate) + n
		last = writer
		written = append(written, writer)
		p.wrote(uint64(n), time.Duration(wait*1e9)+time.Microsecond, compressed)
		wire += n
		q := int(off * 4 / total)
		frames[q]++
		if compressed {
			quarters[q]++
		}
	}
	for i := range quarters {
		quarters[i] /= float64(max(frames[i], 1))
	}
	return wire, writer + queued/l.linkRate, quarters
}

func TestCompressPolicy(t *testing.T) {
	const mib = 1 << 20
	heap := func(uint64) float64 { return 1.0 / 6 }
	random := func(uint64) float64 { return 1.01 }
	tests := []struct {
		name     string
		link     simLink
		total    uint64
		minSave  float64    // raw/wire at least
		maxSave  float64    // raw/wire at most
		quarters [4]float64 // want about this fraction compressed per quarter
	}{
		// A 1 Gbit/s link, a compressible heap: compressed, 3x fewer bytes
		// at the least, even counting the raw start and the refreshes.
		{"1 Gbit/s heap", simLink{125e6, 400e6, 2 * mib, heap}, 1 << 30, 4, 6, [4]float64{0.9, 1, 1, 1}},
		{"1 Gbit/s heap 256 MiB", simLink{125e6, 400e6, 2 * mib, heap}, 256 << 20, 3.5, 6, [4]float64{0.8, 1, 1, 1}},
		// Loopback: the compressor is the bottleneck; raw.
		{"loopback heap", simLink{4e9, 400e6, 2 * mib, heap}, 1 << 30, 1, 1.2, [4]float64{0, 0, 0, 0}},
		// Incompressible data on a slow link: raw.
		{"1 Gbit/s random", simLink{125e6, 400e6, 2 * mib, random}, 1 << 30, 0.9, 1.01, [4]float64{0, 0, 0, 0}},
		// The data turns incompressible halfway: compression goes off.
		{"heap then random", simLink{125e6, 400e6, 2 * mib, func(off uint64) float64 {
			if off < 512<<20 {
				return 1.0 / 6
			}
			return 1.01
		}}, 1 << 30, 1.5, 2.5, [4]float64{0.9, 1, 0, 0}},
		// A compressor about as fast as the link on a 5x heap: it runs
		// beside the writes, so compressed is as fast and 5x smaller.
		{"compressor near the link", simLink{135e6, 150e6, 2 * mib, func(uint64) float64 { return 0.2 }}, 1 << 30, 4, 5, [4]float64{0.9, 1, 1, 1}},
		// A compressor slower than the link, ratio 2: raw moves faster.
		{"slow compressor", simLink{125e6, 100e6, 2 * mib, func(uint64) float64 { return 0.5 }}, 1 << 30, 1, 1.2, [4]float64{0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := newCompressPolicy("auto")
			if err != nil {
				t.Fatal(err)
			}
			wire, secs, q := tt.link.run(p, tt.total)
			save := float64(tt.total) / wire
			t.Logf("raw/wire %.2f, %.2f s, compressed per quarter %.2f", save, secs, q)
			if save < tt.minSave || save > tt.maxSave {
				t.Errorf("raw/wire %.2f, want %.1f..%.1f", save, tt.minSave, tt.maxSave)
			}
			for i := range q {
				if d := q[i] - tt.quarters[i]; d < -0.1 || d > 0.1 {
					t.Errorf("quarter %d: %.2f of frames compressed, want about %.2f", i, q[i], tt.quarters[i])
				}
			}
		})
	}
	for _, mode := range []string{"on", "off"} {
		p, _ := newCompressPolicy(mode)
		_, _, q := simLink{4e9, 400e6, 2 * mib, heap}.run(p, 64<<20)
		if want := map[string]float64{"on": 1, "off": 0}[mode]; q != [4]float64{want, want, want, want} {
			t.Errorf("--compress %s: compressed per quarter %v", mode, q)
		}
	}
	if _, err := newCompressPolicy("sometimes"); err == nil {
		t.Fatal("bad mode accepted")
	}
}

// TestForwardFinal: pages sent in earlier rounds reach the images only if
// the final set keeps or resends them.
func TestForwardFinal(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	store, err := pagestore.New(pagestore.DefaultConfig(dir))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	f, wait := forwardPair(t, ForwardConfig{Compress: "auto"}, store, 2)
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	const base = 0x7f0000000000
	old, fresh := testPages(64, 1), testPages(4, 2)
	for _, err := range []error{
		func() error { _, err := f.Open(k); return err }(),
		f.Add(k, base, 64, pagestore.FlagPresent, old),
		f.Add(k, base+100*pagestore.PageSize, 10, pagestore.FlagPresent, testPages(10, 3)),
		f.BeginFinal(),
		f.Keep(k, base, 32),
		f.Add(k, base+32*pagestore.PageSize, 4, pagestore.FlagPresent, fresh),
		f.Commit(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	got, err := wait()
	if err != nil {
		t.Fatal(err)
	}
	if got.Kept != 32 || f.Stats().Kept != 32 {
		t.Fatalf("kept: received %d, sent %d; want 32", got.Kept, f.Stats().Kept)
	}
	fm, err := os.Open(filepath.Join(dir, "pagemap-1.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer fm.Close()
	pm, err := pagestore.ReadPagemap(fm)
	if err != nil {
		t.Fatal(err)
	}
	var pages uint64
	for _, e := range pm.Entries {
		if e.Vaddr < base || e.Vaddr+e.NrPages*pagestore.PageSize > base+36*pagestore.PageSize {
			t.Fatalf("pagemap entry %+v outside the final set", e)
		}
		pages += e.NrPages
	}
	if pages != 36 {
		t.Fatalf("%d pages in the pagemap, want 36", pages)
	}
	img, err := os.ReadFile(filepath.Join(dir, "pages-1.img"))
	if err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte(nil), old[:32*pagestore.PageSize]...), fresh...)
	if !bytes.Equal(img, want) {
		t.Fatal("pages image differs from the kept and resent pages")
	}
}

// TestForwardResentPages: a page sent again with new content must not be
// named by a later duplicate for its old content.
func TestForwardResentPages(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "images")
	store, err := pagestore.New(pagestore.DefaultConfig(dir))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	f, wait := forwardPair(t, ForwardConfig{Compress: "off"}, store, 1)
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	const base = 0x7f0000000000
	a, b := bytes.Repeat([]byte{'a'}, pagestore.PageSize), bytes.Repeat([]byte{'b'}, pagestore.PageSize)
	steps := []struct {
		vaddr uint64
		data  []byte
	}{
		{base, a},                        // first 'a'
		{base, b},                        // page 0 changes to 'b'
		{base + pagestore.PageSize, a},   // 'a' again: must go as data, page 0 no longer holds it
		{base + 2*pagestore.PageSize, b}, // a dup of page 0's new content is fine
	}
	if _, err := f.Open(k); err != nil {
		t.Fatal(err)
	}
	for _, st := range steps {
		if err := f.Add(k, st.vaddr, 1, pagestore.FlagPresent, st.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Commit(); err != nil {
		t.Fatal(err)
	}
	if _, err := wait(); err != nil {
		t.Fatalf("receiver: %v", err)
	}
	got := make([]byte, 3*pagestore.PageSize)
	if err := store.Read(k, base, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, slices.Concat(b, a, b)) {
		t.Fatal("pages differ from the last copies sent")
	}
}

package pageserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"testing"

	"github.com/phaul/phaul/core/pagestore"
)

// duplex joins a reader and a writer into the ReadWriter a stream is.
type duplex struct {
	io.Reader
	io.Writer
}

// forwardPair connects a Forwarder to Receive over a pipe and returns the
// forwarder and a function that waits for Receive's result.
func forwardPair(t *testing.T, cfg ForwardConfig, store ReceiveStore) (*Forwarder, func() (ForwardStats, error)) {
	t.Helper()
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	f, err := NewForwarder(a, cfg)
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
		st, err := Receive(b, store)
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
	for _, mode := range []string{"off", "on", "auto"} {
		t.Run(mode, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "images")
			store, err := pagestore.New(pagestore.DefaultConfig(dir))
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			f, wait := forwardPair(t, ForwardConfig{Compress: mode}, store)
			k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
			data := testPages(600, 7)
			if _, err := f.Open(k); err != nil {
				t.Fatal(err)
			}
			const base = 0x7f0000000000
			if err := f.Add(k, base, 600, pagestore.FlagPresent, data); err != nil {
				t.Fatal(err)
			}
			if err := f.Add(k, base+1000*pagestore.PageSize, 3, pagestore.FlagLazy, nil); err != nil {
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
			for i := 0; i < 600; i++ {
				if p := data[i*pagestore.PageSize : (i+1)*pagestore.PageSize]; !isZero(p) {
					distinct[string(p)] = true
				}
			}
			if got.Pages != 600 || got.ZeroPages != 150 || got.DataPages != uint64(len(distinct)) ||
				got.DupPages != 450-uint64(len(distinct)) || got.Entries != 1 {
				t.Fatalf("received %+v; want 150 zero, %d distinct", got, len(distinct))
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

func TestReceiveBadInput(t *testing.T) {
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	open := fwdHeader{typ: fwdOpen, kind: k.Kind, id: k.ID}.append(nil)
	page := bytes.Repeat([]byte{1}, pagestore.PageSize)
	frame := func(h fwdHeader, payload []byte) []byte {
		h.length = uint32(len(payload))
		return append(h.append(nil), payload...)
	}
	withReserved := fwdHeader{typ: fwdOpen}.append(nil)
	withReserved[39] = 1
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.ErrUnexpectedEOF},
		{"bad version", append([]byte{9}, make([]byte, fwdHeaderLen-1)...), ErrForward},
		{"reserved", withReserved, ErrForward},
		{"unknown type", fwdHeader{typ: 99}.append(nil), ErrForward},
		{"huge payload", fwdHeader{typ: fwdPages, nrPages: 1, length: fwdMaxPayload + 1}.append(nil), ErrForward},
		{"too many pages", frame(fwdHeader{typ: fwdPages, nrPages: fwdMaxPages + 1}, nil), ErrForward},
		{"short raw payload", frame(fwdHeader{typ: fwdPages, nrPages: 2}, page), ErrForward},
		{"bad zstd", append(open, frame(fwdHeader{typ: fwdPages, nrPages: 1, enc: encZstd}, []byte("not zstd"))...), ErrForward},
		{"unknown encoding", frame(fwdHeader{typ: fwdPages, nrPages: 1, enc: 7}, page), ErrForward},
		{"dup of nothing", append(open, frame(fwdHeader{typ: fwdDup, kind: k.Kind, id: k.ID, nrPages: 1}, dupOf(k, 0x1000))...), ErrForward},
		{"stops mid-payload", append(open, fwdHeader{typ: fwdPages, kind: k.Kind, id: k.ID, nrPages: 1, length: pagestore.PageSize}.append(nil)...), io.ErrUnexpectedEOF},
		{"bad kind", fwdHeader{typ: fwdOpen, kind: 48, id: 1}.append(nil), ErrForward},
		{"task id 0", fwdHeader{typ: fwdOpen, kind: k.Kind}.append(nil), ErrForward},
		{"zero range wraps", append(open, fwdHeader{typ: fwdZero, kind: k.Kind, id: k.ID, vaddr: 1 << 56, nrPages: 1 << 62}.append(nil)...), ErrForward},
		{"pages before open", fwdHeader{typ: fwdZero, kind: k.Kind, id: k.ID, vaddr: 0x1000, nrPages: 1}.append(nil), ErrForward},
		{"unaligned", append(open, fwdHeader{typ: fwdEntry, kind: k.Kind, id: k.ID, vaddr: 5, nrPages: 1, flags: pagestore.FlagLazy}.append(nil)...), ErrForward},
		{"end count wrong", append(open, frame(fwdHeader{typ: fwdEnd, nrPages: 5}, nil)...), ErrForward},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			store := memReceive{newMemStore(t)}
			var out bytes.Buffer
			_, err := Receive(duplex{bytes.NewReader(tt.in), &out}, store)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Receive = %v, want %v", err, tt.want)
			}
			if _, commits := store.counts(); commits != 0 {
				t.Fatal("a bad stream was committed")
			}
		})
	}
}

func FuzzReceive(f *testing.F) {
	k := pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	var good bytes.Buffer
	fw, _ := NewForwarder(duplex{bytes.NewReader(nil), &good}, ForwardConfig{Compress: "on"})
	fw.Open(k)
	fw.Add(k, 0x10000, 8, pagestore.FlagPresent, testPages(8, 1))
	fw.write(fwdHeader{typ: fwdEnd, nrPages: 8}, nil)
	fw.bw.Flush()
	fw.Close()
	f.Add(good.Bytes())
	f.Add(fwdHeader{typ: fwdPages, nrPages: 1, length: 1 << 31}.append(nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		store := memReceive{newMemStore(t)}
		var out bytes.Buffer
		Receive(duplex{bytes.NewReader(in), &out}, store) // must not panic or allocate unboundedly
	})
}

func TestCompressPolicy(t *testing.T) {
	// A slow link and a fast compressor with a good ratio: on.
	p, _ := newCompressPolicy("auto")
	p.wrote(rateWindow, 1e9) // 8 MiB/s link
	for i := 0; i < probeEvery; i++ {
		if p.shouldCompress() {
			p.compressed(1<<20, 1<<18, 2e6) // 500 MB/s, ratio 1/4
		}
	}
	if !p.on {
		t.Fatalf("slow link, good ratio: compression stays off (%+v)", p)
	}
	// A fast link (loopback): off.
	p, _ = newCompressPolicy("auto")
	p.wrote(rateWindow, 2e6) // 4 GB/s
	for i := 0; i < probeEvery; i++ {
		if p.shouldCompress() {
			p.compressed(1<<20, 1<<19, 2e6)
		}
	}
	if p.on {
		t.Fatalf("fast link: compression on (%+v)", p)
	}
	if _, err := newCompressPolicy("sometimes"); err == nil {
		t.Fatal("bad mode accepted")
	}
}

// dupOf is a dup payload naming a page of k that was never sent.
func dupOf(k pagestore.Key, vaddr uint64) []byte {
	p := make([]byte, fwdDupLen)
	p[16] = byte(k.Kind)
	binary.BigEndian.PutUint64(p[24:], k.ID)
	binary.BigEndian.PutUint64(p[32:], vaddr)
	return p
}

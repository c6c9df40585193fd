package pageserver

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// sessionSeeds returns whole client byte streams: a session of every
// command, the recorded CRIU dump with data, 4.1 frames, truncations.
func sessionSeeds(tb testing.TB) [][]byte {
	var full []byte
	full = appendHeader(full, header{cmd: CmdParent, dstID: task1})
	full = appendHeader(full, header{cmd: CmdOpen2, dstID: task1})
	full = appendHeader(full, header{cmd: CmdAddF, flags: FlagPresent, nrPages: 2, vaddr: vaA, dstID: task1})
	full = append(full, pattern(2, 1)...)
	full = appendHeader(full, header{cmd: CmdAddF, flags: FlagLazy, nrPages: 1 << 20, vaddr: vaB, dstID: task1})
	full = appendHeader(full, header{cmd: CmdHole, nrPages: 3, vaddr: vaC, dstID: task1})
	full = appendHeader(full, header{cmd: CmdOpen, dstID: 7<<typeBits | typeShmem})
	full = appendHeader(full, header{cmd: CmdAdd, nrPages: 1, vaddr: 0, dstID: 7<<typeBits | typeShmem})
	full = append(full, pattern(1, 2)...)
	full = appendHeader(full, header{cmd: CmdGet, nrPages: 4, vaddr: vaA, dstID: 1})
	full = appendHeader(full, header{cmd: CmdGet, nrPages: 1, vaddr: vaB, dstID: 1})
	full = appendHeader(full, header{cmd: CmdClose})

	recorded, err := os.ReadFile("testdata/criu-4.2.1-dump-headers.bin")
	if err != nil {
		tb.Fatal(err)
	}
	// The first ranges of the recorded dump, then its CLOSE: small seeds
	// keep the fuzzer fast.
	recorded = append(recorded[:4*HeaderLen], recorded[len(recorded)-HeaderLen:]...)
	var dump []byte
	for off := 0; off+HeaderLen <= len(recorded); off += HeaderLen {
		h := decodeHeader(hdr32(recorded[off:]))
		dump = append(dump, recorded[off:off+HeaderLen]...)
		if h.hasData() {
			dump = append(dump, pattern(int(h.nrPages), byte(off))...)
		}
	}
	v41 := appendHeader41(nil, header{cmd: CmdOpen2, dstID: task1})
	v41 = appendHeader41(v41, header{cmd: CmdAddF, flags: FlagPresent, nrPages: 1, vaddr: vaA, dstID: task1})
	return [][]byte{full, full[:len(full)-40], dump, v41, append(full[:HeaderLen], 0xff, 0xff)}
}

// FuzzSession feeds a byte stream to a server session backed by memStore,
// which fails the test if the server hands it anything spec.md forbids.
// The session must end without panicking, commit only at CLOSE, and never
// store a range whose pages did not all arrive.
func FuzzSession(f *testing.F) {
	for _, s := range sessionSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		store := newMemStore(t)
		store.parents[keyTask1] = true
		srv := &Server{cfg: Config{Store: store}}
		var out bytes.Buffer
		s := newSession(srv, struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(in), &out})
		first, err := s.readFirst()
		if err != nil {
			if ranges, commits := store.counts(); ranges != 0 || commits != 0 {
				t.Fatal("store used before the first header was accepted")
			}
			return
		}
		err = s.run(first)
		ranges, commits := store.counts()
		if commits > 1 || (commits == 1) != s.stats.Committed {
			t.Fatalf("%d commits, stats say committed=%v", commits, s.stats.Committed)
		}
		if err == nil && s.stats.Committed != s.modified && s.modified {
			t.Fatal("a successful session left changes uncommitted")
		}
		if uint64(ranges) != s.stats.Ranges {
			t.Fatalf("store saw %d ranges, stats %d", ranges, s.stats.Ranges)
		}
		if s.stats.PagesIn*PageSize > uint64(len(in)) || s.stats.PagesOut*PageSize > uint64(out.Len()) {
			t.Fatalf("stats %+v beyond %d bytes in, %d out", s.stats, len(in), out.Len())
		}
		if uint64(len(s.buf)) > HeaderLen+MaxPagesPerIOV*PageSize {
			t.Fatalf("buffer of %d bytes", len(s.buf))
		}
	})
}

// FuzzClientReplies feeds arbitrary server replies to a Client running a
// dump-and-GET script: it must fail cleanly, never return more pages than
// it asked for, never accept a reply for another address.
func FuzzClientReplies(f *testing.F) {
	var good []byte
	good = append(good, 0)          // OPEN2: has_parent 0
	good = append(good, 1, 0, 0, 0) // PARENT: 1
	good = appendHeader(good, header{cmd: CmdAddF, flags: FlagPresent, nrPages: 2, vaddr: vaA, dstID: 1})
	good = append(good, pattern(2, 3)...) // GET reply
	good = append(good, 0, 0, 0, 0)       // CLOSE: 0
	f.Add(good)
	f.Add(good[:40])
	f.Add(append([]byte{2}, good[1:]...))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() { // the "server": swallow requests, send in
			defer close(done)
			go io.Copy(io.Discard, a)
			a.SetWriteDeadline(time.Now().Add(time.Second))
			a.Write(in)
			a.Close()
		}()
		c := NewClient(b)
		defer func() {
			c.Abort()
			<-done
		}()
		if _, err := c.Open(keyTask1); err != nil {
			return
		}
		if _, err := c.Parent(keyTask1); err != nil {
			return
		}
		buf := make([]byte, 4*PageSize)
		n, err := c.Get(1, vaA, buf)
		if err != nil {
			return
		}
		if n == 0 || n > 4 {
			t.Fatalf("Get returned %d pages for 4 asked", n)
		}
		if err := c.Close(); err != nil && !errors.Is(err, ErrStatus) {
			return
		}
	})
}

package pageserver

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
)

var (
	keyTask1  = pagestore.Key{Kind: pagestore.KindTask, ID: 1}
	keyShmem7 = pagestore.Key{Kind: pagestore.KindShmem, ID: 7}
)

const (
	vaA = 0x7f0000000000
	vaB = 0x7f0000100000
	vaC = 0x7f0000200000
)

// transports connects a Client to a Server on store in each way spec.md
// allows: a socket pair (ServeConn), TCP loopback, mutual TLS.
func transports(t *testing.T, run func(t *testing.T, connect func(cfg Config) *Client)) {
	t.Run("pipe", func(t *testing.T) {
		run(t, func(cfg Config) *Client {
			srv, err := NewServer(cfg)
			if err != nil {
				t.Fatal(err)
			}
			a, b := net.Pipe()
			done := make(chan error, 1)
			go func() { done <- srv.ServeConn(context.Background(), a) }()
			t.Cleanup(func() {
				b.Close()
				<-done
			})
			return NewClient(b)
		})
	})
	t.Run("tcp", func(t *testing.T) {
		run(t, func(cfg Config) *Client {
			_, addr := startServer(t, cfg)
			return dial(t, addr)
		})
	})
	t.Run("tls", func(t *testing.T) {
		run(t, func(cfg Config) *Client {
			dir := tlsDirs(t, "127.0.0.1")
			var err error
			if cfg.TLS, err = serverTLS(dir, &transport.PeerPolicy{Allow: []string{"127.0.0.1"}}); err != nil {
				t.Fatal(err)
			}
			_, addr := startServer(t, cfg)
			c, err := Dial(context.Background(), addr.String(), clientTLS(t, dir, "127.0.0.1"))
			if err != nil {
				t.Fatal(err)
			}
			return c
		})
	})
}

// TestSession runs a whole session into a real pagestore and checks the
// images it commits.
func TestSession(t *testing.T) {
	transports(t, func(t *testing.T, connect func(Config) *Client) {
		store, dir := newStore(t)
		cfg, rec := testConfig(t, store)
		c := connect(cfg)
		if has, err := c.Open(keyTask1); err != nil || has {
			t.Fatalf("Open = %v, %v; want no parent", has, err)
		}
		a, cpages := pattern(3, 1), pattern(2, 2)
		steps := []error{
			c.Add(keyTask1, vaA, 3, pagestore.FlagPresent, a),
			c.Add(keyTask1, vaB, 10, pagestore.FlagLazy, nil),
			c.Add(keyTask1, vaC, 2, pagestore.FlagPresent|pagestore.FlagLazy, cpages),
			c.Add(keyShmem7, 0, 1, pagestore.FlagPresent, pattern(1, 3)), // opens the segment: no OPEN
		}
		for i, err := range steps {
			if err != nil {
				t.Fatalf("step %d: %v", i, err)
			}
		}
		buf := make([]byte, 4*PageSize)
		if n, err := c.Get(1, vaA, buf); err != nil || n != 3 || !bytes.Equal(buf[:3*PageSize], a) {
			t.Fatalf("Get 4 pages at A: %d pages, %v; want the 3 stored", n, err)
		}
		if n, err := c.Get(1, vaC+PageSize, buf[:PageSize]); err != nil || n != 1 || !bytes.Equal(buf[:PageSize], cpages[PageSize:]) {
			t.Fatalf("Get C+1: %d, %v", n, err)
		}
		if err := c.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		rec.wait("session done", nil)
		pms := readImages(t, dir)
		want := map[string][]pagestore.Entry{
			"pagemap-1.img": {
				{Vaddr: vaA, NrPages: 3, Flags: pagestore.FlagPresent},
				{Vaddr: vaB, NrPages: 10, Flags: pagestore.FlagLazy},
				{Vaddr: vaC, NrPages: 2, Flags: pagestore.FlagPresent | pagestore.FlagLazy},
			},
			"pagemap-shmem-7.img": {{Vaddr: 0, NrPages: 1, Flags: pagestore.FlagPresent}},
		}
		for name, entries := range want {
			pm := pms[name]
			if pm == nil || !equalEntries(pm.Entries, entries) {
				t.Fatalf("%s: %+v, want %+v", name, pm, entries)
			}
		}
		got := pagesOf(t, dir, pms["pagemap-1.img"])
		if !bytes.Equal(got[vaA], a[:PageSize]) || !bytes.Equal(got[vaC+PageSize], cpages[PageSize:]) {
			t.Fatal("pages image content differs from what was sent")
		}
	})
}

func equalEntries(a, b []pagestore.Entry) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// pagesOf reads the present pages of pm from its pages image in dir.
func pagesOf(t testing.TB, dir string, pm *pagestore.Pagemap) map[uint64][]byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "pages-"+strconv.FormatUint(uint64(pm.PagesID), 10)+".img"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64][]byte{}
	off := 0
	for _, e := range pm.Entries {
		if e.Flags&pagestore.FlagPresent == 0 {
			continue
		}
		for i := range e.NrPages {
			if off+PageSize > len(data) {
				t.Fatalf("pages image of %d bytes is short", len(data))
			}
			out[e.Vaddr+i*PageSize] = data[off : off+PageSize]
			off += PageSize
		}
	}
	return out
}

// TestLegacyAndParent sends the commands plain dumps never send, as raw
// frames: OPEN, ADD, HOLE into a pagemap with a parent image, and the
// PARENT query pre-dump starts with (the recorded frame, its answer
// depending on the parent image).
func TestLegacyAndParent(t *testing.T) {
	store, dir := newStore(t)
	if err := os.MkdirAll(filepath.Join(dir, "parent"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "parent", "pagemap-1.img"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, rec := testConfig(t, store)
	cfg.ImagesDir = dir
	_, addr := startServer(t, cfg)

	nc := rawConn(t, addr)
	var b []byte
	b = appendHeader(b, header{cmd: CmdParent, dstID: task1})
	b = appendHeader(b, header{cmd: CmdParent, dstID: 2<<typeBits | typeTask})
	mustWrite(t, nc, b)
	if got := readN(t, nc, 8); !bytes.Equal(got, []byte{1, 0, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("PARENT replies %x, want 1 for task 1 and 0 for task 2", got)
	}
	b = appendHeader(nil, header{cmd: CmdOpen, dstID: task1})
	b = appendHeader(b, header{cmd: CmdAdd, nrPages: 2, vaddr: vaA, dstID: task1})
	b = append(b, pattern(2, 9)...)
	b = appendHeader(b, header{cmd: CmdHole, nrPages: 5, vaddr: vaB, dstID: task1})
	b = appendHeader(b, header{cmd: CmdClose})
	mustWrite(t, nc, b)
	if got := readN(t, nc, 4); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
		t.Fatalf("CLOSE reply %x", got)
	}
	nc.Close()
	rec.wait("session done", nil)
	pm := readImages(t, dir)["pagemap-1.img"]
	want := []pagestore.Entry{{Vaddr: vaA, NrPages: 2, Flags: pagestore.FlagPresent}, {Vaddr: vaB, NrPages: 5, Flags: pagestore.FlagParent}}
	if pm == nil || !equalEntries(pm.Entries, want) {
		t.Fatalf("pagemap %+v, want %+v", pm, want)
	}

	// The recorded pre-dump frame: PARENT for CRIU's vpid.
	rec2, log := newLogRecorder(t)
	cfg.Logger = log
	_, addr = startServer(t, cfg)
	frame, err := os.ReadFile("testdata/criu-4.2.1-predump-headers.bin")
	if err != nil {
		t.Fatal(err)
	}
	nc = rawConn(t, addr)
	mustWrite(t, nc, frame)
	if got := readN(t, nc, 4); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
		t.Fatalf("recorded PARENT reply %x, want 0 (no parent of that pid)", got)
	}
	nc.Close()
	rec2.wait("session failed", ErrUnflushed)
}

// TestReplayRecordedDump replays the headers CRIU 4.2.1 sent for a real
// dump, with page data made up, and checks the committed images carry every
// page with the flags CRIU gave it.
func TestReplayRecordedDump(t *testing.T) {
	frames, err := os.ReadFile("testdata/criu-4.2.1-dump-headers.bin")
	if err != nil {
		t.Fatal(err)
	}
	store, dir := newStore(t)
	cfg, rec := testConfig(t, store)
	_, addr := startServer(t, cfg)
	nc := rawConn(t, addr)
	type page struct {
		flags uint32
		data  []byte
	}
	want := map[uint64]page{}
	var name string
	for off := 0; off < len(frames); off += HeaderLen {
		h := decodeHeader(hdr32(frames[off:]))
		mustWrite(t, nc, frames[off:off+HeaderLen])
		switch h.cmd {
		case CmdOpen2:
			if got := readN(t, nc, 1); got[0] != 0 {
				t.Fatalf("has_parent %d", got[0])
			}
			name = "pagemap-" + strconv.FormatUint(h.dstID>>typeBits, 10) + ".img"
		case CmdAddF:
			data := pattern(int(h.nrPages), byte(off))
			mustWrite(t, nc, data)
			for i := range h.nrPages {
				want[h.vaddr+i*PageSize] = page{uint32(h.flags), data[i*PageSize : (i+1)*PageSize]}
			}
		case CmdClose:
			if got := readN(t, nc, 4); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
				t.Fatalf("CLOSE reply %x", got)
			}
		}
	}
	nc.Close()
	rec.wait("session done", nil)
	pm := readImages(t, dir)[name]
	if pm == nil {
		t.Fatalf("no %s", name)
	}
	got := pagesOf(t, dir, pm)
	flags := map[uint64]uint32{}
	for _, e := range pm.Entries {
		for i := range e.NrPages {
			flags[e.Vaddr+i*PageSize] = e.Flags
		}
	}
	if len(flags) != len(want) {
		t.Fatalf("%d pages in the pagemap, %d sent", len(flags), len(want))
	}
	for va, p := range want {
		if flags[va] != p.flags || !bytes.Equal(got[va], p.data) {
			t.Fatalf("page %#x: flags %d, content equal %v; sent flags %d", va, flags[va], bytes.Equal(got[va], p.data), p.flags)
		}
	}
}

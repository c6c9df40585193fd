package lazy

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	mmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/mm"
	pmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/pagemap"
	pstreeimg "github.com/checkpoint-restore/go-criu/v8/crit/images/pstree"
	vmaimg "github.com/checkpoint-restore/go-criu/v8/crit/images/vma"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/core/pagestore"
)

// mix is the test pattern, the twin of uffdchild.c's: word i of image page
// a of task id is mix(id, a+8*i).
func mix(id, a uint64) uint64 {
	z := a ^ (id * 0x9E3779B97F4A7C15)
	z += 0x9E3779B97F4A7C15
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

func fillPattern(id, vaddr uint64, buf []byte) {
	for i := 0; i+8 <= len(buf); i += 8 {
		binary.LittleEndian.PutUint64(buf[i:], mix(id, vaddr+uint64(i)))
	}
}

// patternSource serves the pattern. Background reads (of more than a
// page) overlapping [gateLo, gateHi) wait until gate is closed, after
// telling gated (once); the page at corrupt (if not 0) is served wrong
// once.
type patternSource struct {
	gateLo, gateHi uint64
	gate           chan struct{}
	gated          chan struct{}
	corrupt        uint64

	mu        sync.Mutex
	told      bool // guarded by mu
	corrupted bool // guarded by mu
}

func (s *patternSource) ReadPages(ctx context.Context, id, vaddr uint64, buf []byte) error {
	end := vaddr + uint64(len(buf))
	if s.gate != nil && len(buf) > pageSize && vaddr < s.gateHi && s.gateLo < end {
		s.mu.Lock()
		if !s.told {
			s.told = true
			close(s.gated)
		}
		s.mu.Unlock()
		select {
		case <-s.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	fillPattern(id, vaddr, buf)
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.corrupt; c != 0 && !s.corrupted && vaddr <= c && c < end {
		s.corrupted = true
		buf[c-vaddr+64*8] ^= 0xff // word 64 of the page
	}
	return nil
}

// testVMA is a VmaEntry as CRIU writes it.
type testVMA struct {
	start, end          uint64
	prot, flags, status uint32
}

// anonVMA is an anonymous private VMA (VMA_AREA_REGULAR|VMA_ANON_PRIVATE).
func anonVMA(start, end uint64, prot uint32) testVMA {
	return testVMA{start: start, end: end, prot: prot, flags: mapPrivate | mapAnonymous, status: 1 | 1<<9}
}

func appendRecord(b []byte, m proto.Message) []byte {
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(err) // test input: a bug in the test
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// mmImage encodes mm-<id>.img with only what phaul reads filled in
// beyond the required fields.
func mmImage(vmas []testVMA) []byte {
	b := binary.LittleEndian.AppendUint32(nil, magicImgCommon)
	b = binary.LittleEndian.AppendUint32(b, magicMM)
	var zero uint64
	mm := &mmimg.MmEntry{
		MmStartCode: &zero, MmEndCode: &zero, MmStartData: &zero, MmEndData: &zero,
		MmStartStack: &zero, MmStartBrk: &zero, MmBrk: &zero, MmArgStart: &zero,
		MmArgEnd: &zero, MmEnvStart: &zero, MmEnvEnd: &zero, ExeFileId: proto.Uint32(1),
	}
	for _, v := range vmas {
		mm.Vmas = append(mm.Vmas, &vmaimg.VmaEntry{
			Start: proto.Uint64(v.start), End: proto.Uint64(v.end), Pgoff: proto.Uint64(0),
			Shmid: proto.Uint64(0), Prot: proto.Uint32(v.prot), Flags: proto.Uint32(v.flags),
			Status: proto.Uint32(v.status), Fd: proto.Int64(-1),
		})
	}
	return appendRecord(b, mm)
}

// pstreeImage encodes pstree.img listing the tasks pids, each its own
// process group and session.
func pstreeImage(pids ...uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, magicImgCommon)
	b = binary.LittleEndian.AppendUint32(b, magicPstree)
	for _, pid := range pids {
		b = appendRecord(b, &pstreeimg.PstreeEntry{Pid: proto.Uint32(pid), Ppid: proto.Uint32(0),
			Pgid: proto.Uint32(pid), Sid: proto.Uint32(pid), Threads: []uint32{pid}})
	}
	return b
}

// pagemapImage encodes a pagemap image as CRIU 4.2 writes it.
func pagemapImage(pagesID uint32, entries []pagestore.Entry) []byte {
	b := binary.LittleEndian.AppendUint32(nil, magicImgCommon)
	b = binary.LittleEndian.AppendUint32(b, 0x56084025)
	b = appendRecord(b, &pmimg.PagemapHead{PagesId: proto.Uint32(pagesID)})
	for _, e := range entries {
		b = appendRecord(b, &pmimg.PagemapEntry{
			Vaddr: proto.Uint64(e.Vaddr), CompatNrPages: proto.Uint32(0),
			Flags: proto.Uint32(e.Flags), NrPages: proto.Uint64(e.NrPages),
		})
	}
	return b
}

func writeFile(t testing.TB, dir, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// writeTaskImages writes pagemap-<id>.img and mm-<id>.img and, for the
// PE_PRESENT entries, pages-<id>.img with the pattern.
func writeTaskImages(t testing.TB, dir string, id uint64, entries []pagestore.Entry, vmas []testVMA) {
	t.Helper()
	writeFile(t, dir, fmt.Sprintf("pagemap-%d.img", id), pagemapImage(uint32(id), entries))
	writeFile(t, dir, fmt.Sprintf("mm-%d.img", id), mmImage(vmas))
	var pages []byte
	for _, e := range entries {
		if e.Flags&pagestore.FlagPresent != 0 {
			buf := make([]byte, e.NrPages*pageSize)
			fillPattern(id, e.Vaddr, buf)
			pages = append(pages, buf...)
		}
	}
	writeFile(t, dir, pagestore.PagesName(uint32(id)), pages)
}

// testLogger logs to t until the test ends.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(b[:len(b)-1]))
	return len(b), nil
}

// server runs d.Serve in the background for a test; cleanup cancels it,
// waits for it and closes d (after the cleanups registered later, which
// kill the served processes).
type server struct {
	d      *Daemon
	cancel context.CancelFunc // ends Serve early
	served chan error
	err    error
	got    bool
}

func startServe(t testing.TB, d *Daemon, timeout time.Duration) *server {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	s := &server{d: d, cancel: cancel, served: make(chan error, 1)}
	go func() { s.served <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := s.wait(); err != nil {
			t.Logf("serve: %v", err)
		}
		d.Close()
	})
	return s
}

// wait returns Serve's result.
func (s *server) wait() error {
	if !s.got {
		s.err, s.got = <-s.served, true
	}
	return s.err
}

package phaul

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/phaul/phaul/core/pagestore"
)

// TestRemoteSetRead serves this process's own memory: whole pages inside
// the declared ranges are read, anything else is refused.
func TestRemoteSetRead(t *testing.T) {
	mem := make([]byte, 8*pagestore.PageSize)
	for i := range mem {
		mem[i] = byte(i * 7)
	}
	base := uint64(reflect.ValueOf(&mem[0]).Pointer())
	start := (base + pagestore.PageSize - 1) &^ (pagestore.PageSize - 1) // page aligned inside mem
	r := newRemoteSet()
	r.add(5, os.Getpid(), start, 2)
	r.add(5, os.Getpid(), start+2*pagestore.PageSize, 2) // adjacent: merged
	r.add(5, os.Getpid(), start+5*pagestore.PageSize, 1)
	if r.pages != 5 || len(r.tasks[5].spans) != 2 {
		t.Fatalf("pages %d spans %v, want 5 pages in 2 spans", r.pages, r.tasks[5].spans)
	}
	off := start - base
	buf := make([]byte, 4*pagestore.PageSize)
	if err := r.read(5, start, buf); err != nil {
		t.Fatalf("read of a merged range: %v", err)
	}
	if !bytes.Equal(buf, mem[off:off+4*pagestore.PageSize]) {
		t.Fatal("read returned other bytes than the process holds")
	}
	for _, tc := range []struct {
		name  string
		id    uint64
		vaddr uint64
		pages int
	}{
		{"unknown task", 6, start, 1},
		{"before", 5, start - pagestore.PageSize, 1},
		{"straddles a hole", 5, start + 3*pagestore.PageSize, 2},
		{"in the hole", 5, start + 4*pagestore.PageSize, 1},
		{"past the end", 5, start + 5*pagestore.PageSize, 2},
	} {
		if err := r.read(tc.id, tc.vaddr, make([]byte, tc.pages*pagestore.PageSize)); err == nil {
			t.Errorf("%s: read succeeded, want a refusal", tc.name)
		}
	}
}

// TestRemoteSpans: the destination takes as remote exactly the top-level
// ranges that are lazy without content (flags 2), not PE_PARENT ranges
// (content in parent/) nor present ones.
func TestRemoteSpans(t *testing.T) {
	dir := t.TempDir()
	m := &pagestore.Pagemap{PagesID: 1, Entries: []pagestore.Entry{
		{Vaddr: 0x10000, NrPages: 2, Flags: pagestore.FlagPresent},
		{Vaddr: 0x12000, NrPages: 3, Flags: pagestore.FlagLazy},
		{Vaddr: 0x15000, NrPages: 1, Flags: pagestore.FlagLazy}, // adjacent: merged
		{Vaddr: 0x20000, NrPages: 4, Flags: pagestore.FlagParent},
		{Vaddr: 0x30000, NrPages: 1, Flags: pagestore.FlagPresent | pagestore.FlagLazy},
		{Vaddr: 0x40000, NrPages: 2, Flags: pagestore.FlagLazy},
	}}
	b, err := pagestore.EncodePagemap(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "pagemap-7.img"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	spans, pages, err := remoteSpans(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []span{{0x12000, 0x16000}, {0x40000, 0x42000}}
	if pages != 6 || len(spans) != 1 || !equalSpans(spans[7], want) {
		t.Fatalf("remoteSpans = %v (%d pages), want task 7: %v (6 pages)", spans, pages, want)
	}
	src := &remoteSource{remote: spans}
	for _, tc := range []struct {
		vaddr, want uint64
		remote      bool
	}{
		{0x10000, 0x2000, false}, {0x12000, 0x4000, true}, {0x14000, 0x2000, true},
		{0x16000, 0x8000, false}, {0x41000, 0x1000, true}, {0x50000, 0x8000, false},
	} {
		n, remote := runAt(spans[7], tc.vaddr, 0x8000)
		if n != tc.want || remote != tc.remote || src.Remote(7, tc.vaddr) != tc.remote {
			t.Errorf("runAt(%#x) = %#x, %v; want %#x, %v", tc.vaddr, n, remote, tc.want, tc.remote)
		}
	}
	// A broken pagemap is an error, not an empty set.
	os.WriteFile(filepath.Join(dir, "pagemap-8.img"), []byte("garbage"), 0o600)
	if _, _, err := remoteSpans(dir); err == nil || !strings.Contains(err.Error(), "pagemap-8.img") {
		t.Fatalf("remoteSpans with a broken pagemap = %v", err)
	}
}

func equalSpans(a, b []span) bool {
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

// TestRemoteSetFile: a remote set survives its file; a truncated or
// overlapping one is refused.
func TestRemoteSetFile(t *testing.T) {
	r := newRemoteSet()
	r.add(1, 100, 0x1000, 2)
	r.add(1, 100, 0x3000, 1) // merged with the first
	r.add(1, 100, 0x8000, 4)
	r.add(7, 107, 0x7f0000000000, 16)
	path := filepath.Join(t.TempDir(), "x.remote")
	if err := writeRemoteSet(path, r); err != nil {
		t.Fatal(err)
	}
	got, err := readRemoteSet(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.pages != r.pages || len(got.tasks) != 2 || !slices.Equal(got.tasks[1].spans, r.tasks[1].spans) ||
		got.tasks[7].pid != 107 || !slices.Equal(got.tasks[7].spans, r.tasks[7].spans) {
		t.Fatalf("read back %+v, wrote %+v", got, r)
	}
	b, _ := os.ReadFile(path)
	if _, err := decodeRemoteSet(bytes.NewReader(b[:len(b)-1])); !errors.Is(err, errRemoteFile) {
		t.Fatalf("truncated: %v", err)
	}
	bad := slices.Clone(b)
	binary.LittleEndian.PutUint64(bad[12+20+16:], 0x1000) // second span starts inside the first
	if _, err := decodeRemoteSet(bytes.NewReader(bad)); !errors.Is(err, errRemoteFile) {
		t.Fatalf("overlapping: %v", err)
	}
}

func FuzzRemoteSet(f *testing.F) {
	r := newRemoteSet()
	r.add(1, 100, 0x1000, 2)
	r.add(3, 103, 0x9000, 1)
	path := filepath.Join(f.TempDir(), "seed")
	if err := writeRemoteSet(path, r); err != nil {
		f.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	f.Add(b)
	f.Add([]byte(remoteMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := decodeRemoteSet(bytes.NewReader(data))
		if err != nil {
			return
		}
		for id, task := range r.tasks {
			for i, s := range task.spans {
				if s.start >= s.end || (i > 0 && task.spans[i-1].end >= s.start) {
					t.Fatalf("task %d: bad span %d %+v", id, i, s)
				}
			}
		}
	})
}

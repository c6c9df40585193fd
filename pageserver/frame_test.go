package pageserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"testing"

	"github.com/phaul/phaul/core/pagestore"
)

// appendHeader41 appends h in CRIU <= 4.1's 24-byte layout.
func appendHeader41(b []byte, h header) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(h.flags)<<16|uint32(h.cmd))
	b = binary.LittleEndian.AppendUint32(b, uint32(h.nrPages))
	b = binary.LittleEndian.AppendUint64(b, h.vaddr)
	return binary.LittleEndian.AppendUint64(b, h.dstID)
}

func hdr32(b []byte) *[HeaderLen]byte   { return (*[HeaderLen]byte)(b[:HeaderLen]) }
func hdr24(b []byte) *[headerLen41]byte { return (*[headerLen41]byte)(b[:headerLen41]) }

const task1 = 1<<typeBits | typeTask // dst_id of vpid 1

// recorded are the headers CRIU 4.2.1 sent to a recording listener: a dump
// over TCP, the same over TLS (stack bytes in the pad), a pre-dump (which
// stops after PARENT on a kernel without soft-dirty).
var recorded = map[string]Command{ // file: first command
	"testdata/criu-4.2.1-dump-headers.bin":     CmdOpen2,
	"testdata/criu-4.2.1-tls-dump-headers.bin": CmdOpen2,
	"testdata/criu-4.2.1-predump-headers.bin":  CmdParent,
}

// TestRecordedHeaders decodes the recorded headers and pins the layout: 32
// bytes, the first header detected as 4.2, every header a valid request
// that re-encodes to the same bytes but the pad.
func TestRecordedHeaders(t *testing.T) {
	for name, first := range recorded {
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) == 0 || len(b)%HeaderLen != 0 {
				t.Fatalf("%d bytes: not whole 32-byte headers", len(b))
			}
			if err := detectVersion(hdr24(b)); err != nil {
				t.Fatalf("first header: %v", err)
			}
			// The same session from CRIU <= 4.1 (24-byte headers) is refused.
			if err := detectVersion(hdr24(appendHeader41(nil, decodeHeader(hdr32(b))))); !errors.Is(err, ErrVersion) {
				t.Fatalf("first header in the 4.1 layout: %v, want ErrVersion", err)
			}
			var cmds []Command
			for off := 0; off < len(b); off += HeaderLen {
				h := decodeHeader(hdr32(b[off:]))
				if _, err := checkRequest(h); err != nil {
					t.Fatalf("header at %d: %v", off, err)
				}
				want := append([]byte(nil), b[off:off+HeaderLen]...)
				clear(want[4:8])
				if got := appendHeader(nil, h); !bytes.Equal(got, want) {
					t.Fatalf("re-encoded %x, recorded %x", got, b[off:off+HeaderLen])
				}
				cmds = append(cmds, h.cmd)
			}
			t.Logf("commands: %v", cmds)
			if cmds[0] != first {
				t.Fatalf("first command %v, want %v", cmds[0], first)
			}
		})
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	for _, h := range []header{
		{cmd: CmdOpen2, dstID: task1},
		{cmd: CmdAddF, flags: FlagPresent | FlagLazy, nrPages: 3, vaddr: 0x7f0000001000, dstID: task1},
		{cmd: CmdGet, nrPages: MaxPagesPerIOV, vaddr: MaxAddress - MaxPagesPerIOV*PageSize, dstID: MaxPID},
		{cmd: CmdClose},
		{cmd: Command(0xffff), flags: 0xffff, nrPages: ^uint64(0), vaddr: ^uint64(0), dstID: ^uint64(0)},
	} {
		b := appendHeader(nil, h)
		if len(b) != HeaderLen {
			t.Fatalf("%v: %d bytes", h, len(b))
		}
		if got := decodeHeader(hdr32(b)); got != h {
			t.Fatalf("round trip %v: got %v", h, got)
		}
	}
	// CRIU 4.2.1 over TLS sent pad 0x5555 (stack bytes): ignored.
	h := header{cmd: CmdAddF, flags: FlagPresent, nrPages: 1, vaddr: 0x7f0000001000, dstID: task1}
	b := appendHeader(nil, h)
	b[4], b[5] = 0x55, 0x55
	if got := decodeHeader(hdr32(b)); got != h {
		t.Fatalf("pad 0x5555: got %v, want %v", got, h)
	}
}

// TestDetectVersion applies the header-version rule (spec.md §2.3) to the
// first header of each kind of CRIU session in both layouts.
func TestDetectVersion(t *testing.T) {
	sessions := []struct {
		name  string
		first header
	}{
		{"dump OPEN2", header{cmd: CmdOpen2, dstID: 31862<<typeBits | typeTask}},
		{"pre-dump PARENT", header{cmd: CmdParent, dstID: 1<<typeBits | typeTask}},
		{"legacy OPEN shmem", header{cmd: CmdOpen, dstID: 0x2a<<typeBits | typeShmem}},
		{"lazy GET", header{cmd: CmdGet, nrPages: 1, vaddr: 0x7f1234567000, dstID: 1}},
		{"ADD_F without open", header{cmd: CmdAddF, flags: FlagPresent, nrPages: 2, vaddr: 0x400000, dstID: task1}},
		{"legacy ADD", header{cmd: CmdAdd, nrPages: 1, vaddr: 0x400000, dstID: task1}},
	}
	for _, s := range sessions {
		t.Run(s.name, func(t *testing.T) {
			b := appendHeader(nil, s.first)
			if err := detectVersion(hdr24(b)); err != nil {
				t.Errorf("4.2 header: %v", err)
			}
			b[4], b[5], b[6], b[7] = 0x55, 0x55, 0, 0 // stack bytes in the pad
			if err := detectVersion(hdr24(b)); err != nil {
				t.Errorf("4.2 header with pad 0x5555: %v", err)
			}
			if err := detectVersion(hdr24(appendHeader41(nil, s.first))); !errors.Is(err, ErrVersion) {
				t.Errorf("4.1 header: %v, want ErrVersion", err)
			}
		})
	}
	// A 4.1 GET for a vpid that is a multiple of 4096 passes the rule, but
	// its vaddr, read as nr_pages, is refused.
	b := appendHeader41(nil, header{cmd: CmdGet, nrPages: 1, vaddr: 0x7f1234567000, dstID: 4096})
	b = append(b, make([]byte, 8)...)
	if err := detectVersion(hdr24(b)); err != nil {
		t.Errorf("4.1 GET of vpid 4096: %v", err)
	}
	if _, err := checkRequest(decodeHeader(hdr32(b))); !errors.Is(err, ErrTooLarge) {
		t.Errorf("4.1 GET of vpid 4096 read as 4.2: %v, want ErrTooLarge", err)
	}
	// A CLOSE is all zeros but the command in both layouts: read as 4.2.
	if err := detectVersion(hdr24(appendHeader41(nil, header{cmd: CmdClose}))); err != nil {
		t.Errorf("CLOSE: %v", err)
	}
	if err := detectVersion(hdr24(appendHeader(nil, header{cmd: 0x99}))); !errors.Is(err, ErrCommand) {
		t.Errorf("unknown command: %v, want ErrCommand", err)
	}
}

func TestCheckRequest(t *testing.T) {
	const va = 0x7f0000000000
	tests := []struct {
		name string
		h    header
		want error // nil: valid
	}{
		{"open2", header{cmd: CmdOpen2, dstID: task1}, nil},
		{"open2 shmem", header{cmd: CmdOpen2, dstID: 77<<typeBits | typeShmem}, nil},
		{"open2 legacy type 11", header{cmd: CmdOpen2, dstID: 5<<typeBits | 11}, nil},
		{"open2 pid 0", header{cmd: CmdOpen2, dstID: typeTask}, ErrHeader},
		{"open2 pid above MaxPID", header{cmd: CmdOpen2, dstID: (MaxPID+1)<<typeBits | typeTask}, ErrHeader},
		{"open2 unknown type", header{cmd: CmdOpen2, dstID: 1<<typeBits | 3}, ErrHeader},
		{"open2 with range", header{cmd: CmdOpen2, nrPages: 1, dstID: task1}, ErrHeader},
		{"open with flags", header{cmd: CmdOpen, flags: FlagPresent, dstID: task1}, ErrHeader},
		{"parent", header{cmd: CmdParent, dstID: task1}, nil},
		{"add_f present", header{cmd: CmdAddF, flags: FlagPresent, nrPages: 1, vaddr: va, dstID: task1}, nil},
		{"add_f lazy huge", header{cmd: CmdAddF, flags: FlagLazy, nrPages: 1 << 30, vaddr: va, dstID: task1}, nil},
		{"add_f flags 0", header{cmd: CmdAddF, nrPages: 1, vaddr: va, dstID: task1}, ErrHeader},
		{"add_f flags parent|present", header{cmd: CmdAddF, flags: FlagParent | FlagPresent, nrPages: 1, vaddr: va, dstID: task1}, ErrHeader},
		{"add_f flags 8", header{cmd: CmdAddF, flags: 8, nrPages: 1, vaddr: va, dstID: task1}, ErrHeader},
		{"add 0 pages", header{cmd: CmdAdd, vaddr: va, dstID: task1}, ErrHeader},
		{"add MaxPagesPerIOV", header{cmd: CmdAdd, nrPages: MaxPagesPerIOV, vaddr: va, dstID: task1}, nil},
		{"add absurd nr_pages", header{cmd: CmdAdd, nrPages: MaxPagesPerIOV + 1, vaddr: va, dstID: task1}, ErrTooLarge},
		{"add_f nr_pages 2^63", header{cmd: CmdAddF, flags: FlagPresent, nrPages: 1 << 63, vaddr: va, dstID: task1}, ErrTooLarge},
		{"hole overflowing", header{cmd: CmdHole, nrPages: 1 << 52, vaddr: va, dstID: task1}, ErrAddress},
		{"hole wrapping u64", header{cmd: CmdHole, nrPages: 1 << 52, vaddr: 1<<64 - PageSize, dstID: task1}, ErrAddress},
		{"add at MaxAddress", header{cmd: CmdAdd, nrPages: 1, vaddr: MaxAddress, dstID: task1}, ErrAddress},
		{"add ending at MaxAddress", header{cmd: CmdAdd, nrPages: 1, vaddr: MaxAddress - PageSize, dstID: task1}, nil},
		{"add unaligned", header{cmd: CmdAdd, nrPages: 1, vaddr: va + 1, dstID: task1}, ErrAddress},
		{"get", header{cmd: CmdGet, nrPages: 1, vaddr: va, dstID: 1}, nil},
		{"get typed dst", header{cmd: CmdGet, nrPages: 1, vaddr: va, dstID: (MaxPID+1)<<typeBits | typeTask}, ErrHeader},
		{"get too many", header{cmd: CmdGet, nrPages: MaxPagesPerIOV + 1, vaddr: va, dstID: 1}, ErrTooLarge},
		{"close", header{cmd: CmdClose}, nil},
		{"close with dst", header{cmd: CmdClose, dstID: task1}, ErrHeader},
		{"force close with flags", header{cmd: CmdForceClose, flags: 1}, ErrHeader},
		{"unknown", header{cmd: 8}, ErrCommand},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := checkRequest(tt.h)
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("checkRequest(%v) = %v, want %v", tt.h, err, tt.want)
			}
		})
	}
}

func TestDstID(t *testing.T) {
	for _, k := range []pagestore.Key{
		{Kind: pagestore.KindTask, ID: 1},
		{Kind: pagestore.KindTask, ID: MaxPID},
		{Kind: pagestore.KindShmem, ID: 0},
		{Kind: pagestore.KindShmem, ID: 1<<56 - 1},
	} {
		dst, err := dstIDOf(k)
		if err != nil {
			t.Fatalf("%v: %v", k, err)
		}
		if got, err := keyOf(dst); err != nil || got != k {
			t.Fatalf("%v -> %#x -> %v, %v", k, dst, got, err)
		}
	}
	for _, k := range []pagestore.Key{{Kind: pagestore.KindTask}, {Kind: pagestore.KindTask, ID: MaxPID + 1}, {Kind: 3, ID: 1}} {
		if _, err := dstIDOf(k); !errors.Is(err, ErrHeader) {
			t.Fatalf("%v: %v, want ErrHeader", k, err)
		}
	}
}

// FuzzHeader runs every header decoder on arbitrary bytes: decodeHeader
// round-trips, checkRequest's promises hold (no overflow, bounded data),
// detectVersion and decodeHeader41 never panic, keyOf inverts dstIDOf.
func FuzzHeader(f *testing.F) {
	for name := range recorded {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		for off := 0; off+HeaderLen <= len(b); off += HeaderLen {
			f.Add(b[off : off+HeaderLen])
		}
	}
	f.Add(appendHeader(nil, header{cmd: CmdGet, nrPages: 1, vaddr: 0x1000, dstID: 1}))
	f.Add(appendHeader(nil, header{cmd: CmdHole, nrPages: 1 << 52, vaddr: 1<<64 - PageSize, dstID: task1}))
	f.Add(appendHeader41(appendHeader41(nil, header{cmd: CmdOpen2, dstID: task1}), header{cmd: CmdClose}))
	f.Add(make([]byte, HeaderLen))
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) >= headerLen41 {
			err := detectVersion(hdr24(in))
			if err != nil && !errors.Is(err, ErrVersion) && !errors.Is(err, ErrCommand) {
				t.Fatalf("detectVersion: unexpected error %v", err)
			}
		}
		if len(in) < HeaderLen {
			return
		}
		h := decodeHeader(hdr32(in))
		want := append([]byte(nil), in[:HeaderLen]...)
		clear(want[4:8]) // the pad is not kept
		if got := appendHeader(nil, h); !bytes.Equal(got, want) {
			t.Fatalf("round trip: %x -> %v -> %x", in[:HeaderLen], h, got)
		}
		k, err := checkRequest(h)
		if err != nil {
			return
		}
		switch h.cmd {
		case CmdAdd, CmdAddF, CmdHole, CmdGet:
			end := h.vaddr + h.nrPages*PageSize
			if h.nrPages == 0 || h.vaddr%PageSize != 0 || h.nrPages > MaxAddress/PageSize || end > MaxAddress || end <= h.vaddr {
				t.Fatalf("checkRequest passed a bad range: %v", h)
			}
			if (h.hasData() || h.cmd == CmdGet) && h.nrPages > MaxPagesPerIOV {
				t.Fatalf("checkRequest passed %d pages of data", h.nrPages)
			}
		}
		if h.cmd != CmdGet && h.cmd != CmdClose && h.cmd != CmdForceClose {
			if k2, err := keyOf(h.dstID); err != nil || k2 != k {
				t.Fatalf("keyOf(%#x) = %v, %v; checkRequest said %v", h.dstID, k2, err, k)
			}
			dst, err := dstIDOf(k)
			if err != nil {
				t.Fatalf("dstIDOf(%v): %v", k, err)
			}
			if k3, err := keyOf(dst); err != nil || k3 != k {
				t.Fatalf("dstIDOf/keyOf round trip %v -> %#x -> %v, %v", k, dst, k3, err)
			}
		}
	})
}

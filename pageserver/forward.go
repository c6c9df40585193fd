package pageserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/phaul/phaul/core/pagestore"
)

// The forward protocol carries pages from the source's agent (a Forwarder,
// the Store behind the page server CRIU dumps into) to the destination's
// store (Receive), on one or more yamux streams (lanes) of the migration's
// connection. forward.md beside this file is its specification.

const (
	fwdVersion   = 1
	fwdHeaderLen = 40
	// fwdMaxPages bounds one pages frame; its payload (raw or zstd) is
	// bounded by fwdMaxPayload.
	fwdMaxPages   = 256
	fwdMaxPayload = fwdMaxPages*pagestore.PageSize + 64<<10
	// A batch frame's payload is (or decodes to) at most fwdMaxBatch
	// bytes of frames; the sender closes a batch once it holds
	// fwdBatchTarget.
	fwdMaxBatch    = 2 << 20
	fwdBatchTarget = 1 << 20
	fwdDupLen      = 16 + 24 // hash, ref kind+pad, ref id, ref vaddr
	// MaxLanes bounds the streams one forward session spreads over.
	MaxLanes = 16
)

type fwdType uint8

const (
	// Inside batches only:
	fwdOpen  fwdType = 1 // open pagemap (kind, id)
	fwdPages fwdType = 2 // nrPages present pages, raw
	fwdZero  fwdType = 3 // nrPages present zero pages, no payload
	fwdDup   fwdType = 4 // one page equal to a page sent earlier
	fwdEntry fwdType = 5 // pages without content here (lazy, parent)
	// On a lane:
	fwdEnd   fwdType = 6 // last frame of every lane; nrPages = pages, vaddr = batches sent in all
	fwdAck   fwdType = 7 // receiver to sender on lane 0: stored and committed; flags = 0 ok
	fwdBatch fwdType = 8 // id = sequence number; a run of inner frames, raw or zstd
	fwdLane  fwdType = 9 // first frame of every lane: id = lane, nrPages = lanes
	// Inside batches only:
	fwdFinal fwdType = 10 // the final set begins (pagestore.Store.BeginFinal)
	fwdKeep  fwdType = 11 // nrPages pages already sent belong to the final set as they are
)

const (
	encRaw  = 0
	encZstd = 1
)

// ErrForward is wrapped by every malformed forward frame.
var ErrForward = errors.New("pageserver: malformed forward frame")

type fwdHeader struct {
	typ     fwdType
	kind    pagestore.Kind
	enc     uint8
	length  uint32 // payload bytes
	id      uint64
	vaddr   uint64
	nrPages uint64
	flags   uint32
}

func (h fwdHeader) append(b []byte) []byte {
	var a [fwdHeaderLen]byte
	a[0], a[1], a[2], a[3] = fwdVersion, byte(h.typ), byte(h.kind), h.enc
	binary.BigEndian.PutUint32(a[4:], h.length)
	binary.BigEndian.PutUint64(a[8:], h.id)
	binary.BigEndian.PutUint64(a[16:], h.vaddr)
	binary.BigEndian.PutUint64(a[24:], h.nrPages)
	binary.BigEndian.PutUint32(a[32:], h.flags)
	return append(b, a[:]...)
}

func decodeFwdHeader(a []byte) (fwdHeader, error) {
	h := fwdHeader{
		typ: fwdType(a[1]), kind: pagestore.Kind(a[2]), enc: a[3],
		length: binary.BigEndian.Uint32(a[4:]), id: binary.BigEndian.Uint64(a[8:]),
		vaddr: binary.BigEndian.Uint64(a[16:]), nrPages: binary.BigEndian.Uint64(a[24:]),
		flags: binary.BigEndian.Uint32(a[32:]),
	}
	if a[0] != fwdVersion {
		return h, fmt.Errorf("%w: version %d", ErrForward, a[0])
	}
	if binary.BigEndian.Uint32(a[36:]) != 0 {
		return h, fmt.Errorf("%w: reserved bytes set", ErrForward)
	}
	maxLen := uint32(fwdMaxPayload)
	if h.typ == fwdBatch {
		maxLen = fwdMaxBatch
	}
	if h.length > maxLen {
		return h, fmt.Errorf("%w: type %d with a payload of %d bytes", ErrForward, h.typ, h.length)
	}
	want := -1 // payload length each type demands; -1: checked below
	switch h.typ {
	case fwdOpen, fwdZero, fwdEntry, fwdEnd, fwdAck, fwdLane, fwdKeep:
		want = 0
	case fwdFinal:
		if h.kind != 0 || h.id != 0 || h.vaddr != 0 || h.nrPages != 0 {
			return h, fmt.Errorf("%w: final header %+v", ErrForward, h)
		}
		want = 0
	case fwdDup:
		want = fwdDupLen
		if h.nrPages != 1 {
			return h, fmt.Errorf("%w: dup of %d pages", ErrForward, h.nrPages)
		}
	case fwdPages:
		if h.nrPages == 0 || h.nrPages > fwdMaxPages {
			return h, fmt.Errorf("%w: %d pages in one frame", ErrForward, h.nrPages)
		}
		want = int(h.nrPages) * pagestore.PageSize
	case fwdBatch:
		if (h.enc != encRaw && h.enc != encZstd) || h.length == 0 || h.kind != 0 || h.vaddr != 0 || h.nrPages != 0 || h.flags != 0 {
			return h, fmt.Errorf("%w: batch header %+v", ErrForward, h)
		}
	default:
		return h, fmt.Errorf("%w: type %d", ErrForward, h.typ)
	}
	switch h.typ {
	case fwdOpen, fwdPages, fwdZero, fwdDup, fwdEntry, fwdKeep:
		if err := checkFwdKey(h.kind, h.id); err != nil {
			return h, err
		}
	case fwdLane:
		if h.nrPages == 0 || h.nrPages > MaxLanes || h.id >= h.nrPages {
			return h, fmt.Errorf("%w: lane %d of %d", ErrForward, h.id, h.nrPages)
		}
	}
	switch h.typ {
	case fwdPages, fwdZero, fwdDup, fwdEntry, fwdKeep:
		// A range inside user address space, page aligned, not wrapping.
		if h.nrPages == 0 || h.vaddr%pagestore.PageSize != 0 || h.vaddr >= MaxAddress ||
			h.nrPages > (MaxAddress-h.vaddr)/pagestore.PageSize {
			return h, fmt.Errorf("%w: range %#x + %d pages", ErrForward, h.vaddr, h.nrPages)
		}
	}
	switch h.typ {
	case fwdEntry:
		if h.flags != pagestore.FlagLazy && h.flags != pagestore.FlagParent {
			return h, fmt.Errorf("%w: entry flags %#x", ErrForward, h.flags)
		}
	case fwdAck:
	default:
		if h.flags != 0 {
			return h, fmt.Errorf("%w: flags %#x on type %d", ErrForward, h.flags, h.typ)
		}
	}
	if h.typ != fwdBatch && h.enc != encRaw {
		return h, fmt.Errorf("%w: encoding %d on type %d", ErrForward, h.enc, h.typ)
	}
	if want >= 0 && int(h.length) != want {
		return h, fmt.Errorf("%w: type %d with %d payload bytes", ErrForward, h.typ, h.length)
	}
	return h, nil
}

// checkFwdKey bounds a pagemap identity from the wire.
func checkFwdKey(kind pagestore.Kind, id uint64) error {
	switch {
	case kind == pagestore.KindTask && (id == 0 || id > MaxPID):
		return fmt.Errorf("%w: task id %d", ErrForward, id)
	case kind == pagestore.KindShmem && id >= 1<<56: // CRIU's dst_id keeps 56 bits
		return fmt.Errorf("%w: shmem id %d", ErrForward, id)
	case kind != pagestore.KindTask && kind != pagestore.KindShmem:
		return fmt.Errorf("%w: pagemap kind %d", ErrForward, kind)
	}
	return nil
}

// ForwardStats counts what crossed one forward session.
type ForwardStats struct {
	Pages      uint64      `json:"pages"`      // present pages, all kinds
	ZeroPages  uint64      `json:"zero_pages"` // sent as zero frames, no bytes
	DupPages   uint64      `json:"dup_pages"`  // sent as references to an earlier page
	DataPages  uint64      `json:"data_pages"` // sent with their bytes
	RawBytes   uint64      `json:"raw_bytes"`  // bytes of data pages before compression
	WireBytes  uint64      `json:"wire_bytes"` // frame bytes written, headers included
	Batches    uint64      `json:"batches"`    // batch frames
	Compressed uint64      `json:"compressed"` // batch frames sent zstd-compressed
	Entries    uint64      `json:"entries"`    // content-less ranges (lazy, parent)
	Kept       uint64      `json:"kept"`       // pages sent before, kept in the final set
	Lanes      []LaneStats `json:"lanes"`      // per stream
	// What the compression policy measured last (auto mode; 0: never):
	// the link's rate over raw frames and the compressor's, in MB/s, and
	// the compressed/raw ratio.
	LinkMBps  float64 `json:"link_mbps"`
	ZstdMBps  float64 `json:"zstd_mbps"`
	ZstdRatio float64 `json:"zstd_ratio"`
	Switches  uint64  `json:"compress_switches"` // times auto turned zstd on or off
}

// LaneStats counts what crossed one lane (stream) of a session.
type LaneStats struct {
	Batches    uint64 `json:"batches"`
	Compressed uint64 `json:"compressed"`
	RawBytes   uint64 `json:"raw_bytes"`  // batch bytes before compression
	WireBytes  uint64 `json:"wire_bytes"` // frame bytes on the lane
}

// ForwardConfig configures a Forwarder.
type ForwardConfig struct {
	// Compress: "auto" measures and switches zstd on when the link is
	// slower than the compressor on this data; "on"; "off".
	Compress string
	// AckTimeout bounds the wait for the receiver's acknowledgement at
	// Commit.
	AckTimeout time.Duration
}

type pageRef struct {
	kind  pagestore.Kind
	id    uint64
	vaddr uint64
}

// deadliner is what a stream offers to bound the acknowledgement wait and
// to stop a receiving lane.
type deadliner interface {
	SetReadDeadline(time.Time) error
}

var zeroPage [pagestore.PageSize]byte

func isZero(p []byte) bool { return bytes.Equal(p, zeroPage[:]) }

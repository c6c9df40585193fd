package pageserver

import (
	"encoding/binary"
	"fmt"

	"github.com/phaul/phaul/core/pagestore"
)

// header is one CRIU page_server_iov (spec.md §2.1), decoded.
type header struct {
	cmd     Command
	flags   Flags // ADD_F only
	nrPages uint64
	vaddr   uint64
	dstID   uint64
}

func (h header) String() string {
	return fmt.Sprintf("%v flags=%#x nr_pages=%d vaddr=%#x dst_id=%#x", h.cmd, uint16(h.flags), h.nrPages, h.vaddr, h.dstID)
}

// appendHeader appends h in the CRIU 4.2 layout: 32 bytes, little-endian
// as CRIU writes them on x86-64, pad zero.
func appendHeader(b []byte, h header) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(h.flags)<<16|uint32(h.cmd))
	b = binary.LittleEndian.AppendUint32(b, 0)
	b = binary.LittleEndian.AppendUint64(b, h.nrPages)
	b = binary.LittleEndian.AppendUint64(b, h.vaddr)
	return binary.LittleEndian.AppendUint64(b, h.dstID)
}

// AppendCommand appends the header of a bare command (no pages, no
// address, no destination), such as CLOSE.
func AppendCommand(b []byte, cmd Command) []byte { return appendHeader(b, header{cmd: cmd}) }

// decodeHeader parses a CRIU 4.2 header. It ignores the pad, as CRIU
// does: CRIU 4.2.1 leaves stack bytes there. What the fields mean is
// checked by checkRequest.
func decodeHeader(b *[HeaderLen]byte) header {
	cmd := binary.LittleEndian.Uint32(b[0:4])
	return header{
		cmd:     Command(cmd),
		flags:   Flags(cmd >> 16),
		nrPages: binary.LittleEndian.Uint64(b[8:16]),
		vaddr:   binary.LittleEndian.Uint64(b[16:24]),
		dstID:   binary.LittleEndian.Uint64(b[24:32]),
	}
}

// decodeHeader41 parses a CRIU <= 4.1 header, for the log line that
// refuses its sender.
func decodeHeader41(b *[headerLen41]byte) header {
	cmd := binary.LittleEndian.Uint32(b[0:4])
	return header{
		cmd:     Command(cmd),
		flags:   Flags(cmd >> 16),
		nrPages: uint64(binary.LittleEndian.Uint32(b[4:8])),
		vaddr:   binary.LittleEndian.Uint64(b[8:16]),
		dstID:   binary.LittleEndian.Uint64(b[16:24]),
	}
}

// detectVersion applies the header-version rule (spec.md §2.3) to the
// first 24 bytes of a connection: nil for a CRIU 4.2 peer, ErrVersion
// (with the 4.1 reading of the header) for a CRIU <= 4.1 peer, ErrCommand
// for a command neither knows.
func detectVersion(p *[headerLen41]byte) error {
	cmd := Command(binary.LittleEndian.Uint32(p[0:4]))
	if !cmd.known() {
		return fmt.Errorf("%w: first header: %v", ErrCommand, cmd)
	}
	// Bytes 16..24 are vaddr in 4.2: 0 or page aligned. In 4.1 they are
	// dst_id, whose low byte is its type (>= 1), or GET's plain vpid.
	if binary.LittleEndian.Uint64(p[16:24])%PageSize != 0 {
		return fmt.Errorf("%w: first header read as 4.1: %v", ErrVersion, decodeHeader41(p))
	}
	return nil
}

// rangeFlags returns the pagemap flags of a range command: ADD means
// present, HOLE means parent.
func (h header) rangeFlags() Flags {
	switch h.cmd {
	case CmdAdd:
		return FlagPresent
	case CmdHole:
		return FlagParent
	}
	return h.flags
}

// hasData reports whether nrPages*PageSize bytes follow h.
func (h header) hasData() bool {
	return (h.cmd == CmdAdd || h.cmd == CmdAddF) && h.rangeFlags()&FlagPresent != 0
}

// checkRequest checks a header a client sent against spec.md §3-§5 and
// returns the store key it names (the zero Key for CLOSE). When it
// returns nil, nrPages*PageSize cannot overflow and, where data follows or
// GET asks for it, is at most MaxPagesPerIOV pages.
func checkRequest(h header) (pagestore.Key, error) {
	if !h.cmd.known() {
		return pagestore.Key{}, fmt.Errorf("%w: %v", ErrCommand, h.cmd)
	}
	if h.cmd != CmdAddF && h.flags != 0 {
		return pagestore.Key{}, fmt.Errorf("%w: %v carries flags %#x", ErrHeader, h.cmd, uint16(h.flags))
	}
	switch h.cmd {
	case CmdClose, CmdForceClose:
		if h.nrPages != 0 || h.vaddr != 0 || h.dstID != 0 {
			return pagestore.Key{}, fmt.Errorf("%w: %v with non-zero fields: %v", ErrHeader, h.cmd, h)
		}
		return pagestore.Key{}, nil
	case CmdOpen, CmdOpen2, CmdParent:
		if h.nrPages != 0 || h.vaddr != 0 {
			return pagestore.Key{}, fmt.Errorf("%w: %v with a range: %v", ErrHeader, h.cmd, h)
		}
		return keyOf(h.dstID)
	case CmdGet:
		if err := checkRange(h, true); err != nil {
			return pagestore.Key{}, err
		}
		if h.dstID == 0 || h.dstID > MaxPID {
			return pagestore.Key{}, fmt.Errorf("%w: GET for vpid %d, want 1..%d", ErrHeader, h.dstID, MaxPID)
		}
		return pagestore.Key{Kind: pagestore.KindTask, ID: h.dstID}, nil
	}
	// ADD, HOLE, ADD_F
	if h.cmd == CmdAddF && !validFlags(h.flags) {
		return pagestore.Key{}, fmt.Errorf("%w: ADD_F flags %#x", ErrHeader, uint16(h.flags))
	}
	if err := checkRange(h, h.hasData()); err != nil {
		return pagestore.Key{}, err
	}
	return keyOf(h.dstID)
}

// checkRange bounds h's page count and address range (spec.md §5); data
// says whether pages travel for it.
func checkRange(h header, data bool) error {
	if h.nrPages == 0 {
		return fmt.Errorf("%w: %v of 0 pages", ErrHeader, h.cmd)
	}
	if data && h.nrPages > MaxPagesPerIOV {
		return fmt.Errorf("%w: %v of %d pages, limit %d", ErrTooLarge, h.cmd, h.nrPages, MaxPagesPerIOV)
	}
	if h.vaddr%PageSize != 0 {
		return fmt.Errorf("%w: %v at unaligned address %#x", ErrAddress, h.cmd, h.vaddr)
	}
	if h.vaddr >= MaxAddress || h.nrPages > (MaxAddress-h.vaddr)/PageSize {
		return fmt.Errorf("%w: %v of %d pages at %#x ends past %#x", ErrAddress, h.cmd, h.nrPages, h.vaddr, uint64(MaxAddress))
	}
	return nil
}

// keyOf decodes a dst_id (spec.md §4.1) into the store key it names.
func keyOf(dstID uint64) (pagestore.Key, error) {
	id := dstID >> typeBits
	switch t := dstID & (1<<typeBits - 1); t {
	case typeTask, 10, 11, 16, 17: // old CRIUs numbered the types differently
		if id == 0 || id > MaxPID {
			return pagestore.Key{}, fmt.Errorf("%w: dst_id %#x: task %d, want 1..%d", ErrHeader, dstID, id, MaxPID)
		}
		return pagestore.Key{Kind: pagestore.KindTask, ID: id}, nil
	case typeShmem, 27, 28, 29, 32, 33, 34:
		return pagestore.Key{Kind: pagestore.KindShmem, ID: id}, nil
	default:
		return pagestore.Key{}, fmt.Errorf("%w: dst_id %#x: unknown type %d", ErrHeader, dstID, t)
	}
}

// dstIDOf encodes k as a dst_id, the inverse of keyOf for current types.
func dstIDOf(k pagestore.Key) (uint64, error) {
	switch {
	case k.Kind == pagestore.KindTask && k.ID >= 1 && k.ID <= MaxPID:
		return k.ID<<typeBits | typeTask, nil
	case k.Kind == pagestore.KindShmem && k.ID < 1<<(64-typeBits):
		return k.ID<<typeBits | typeShmem, nil
	}
	return 0, fmt.Errorf("%w: no dst_id for %+v", ErrHeader, k)
}

package pagestore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	pmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/pagemap"
	"google.golang.org/protobuf/proto"
)

// Image magics (criu/include/magic.h), written in host order, little-endian
// on amd64 like every size word of an image.
const (
	magicImgCommon uint32 = 0x54564319
	magicPagemap   uint32 = 0x56084025
)

const (
	// maxRecordBytes bounds one protobuf record of a pagemap image. CRIU's
	// entries take at most 36 bytes; the slack allows unknown fields.
	maxRecordBytes = 1 << 10
	// MaxEntries bounds the entries ReadPagemap accepts.
	MaxEntries = 1 << 22
)

// Entry is one pagemap entry as CRIU 4.2 reads it.
type Entry struct {
	Vaddr   uint64 // page address, or offset in the segment for shmem
	NrPages uint64
	Flags   uint32 // FlagPresent, FlagPresent|FlagLazy, FlagLazy or FlagParent
}

// Pagemap is a decoded pagemap image: the pages of its PRESENT entries are
// in pages-<PagesID>.img, in entry order.
type Pagemap struct {
	PagesID uint32
	Entries []Entry
}

// PresentPages returns the pages the pages image must hold.
func (m *Pagemap) PresentPages() uint64 {
	var n uint64
	for _, e := range m.Entries {
		if e.Flags&FlagPresent != 0 {
			n += e.NrPages
		}
	}
	return n
}

// ReadPagemap decodes a pagemap image (pagemap-*.img or pagemap-shmem-
// *.img) as CRIU 4.2's restore does: nr_pages from field 5, else from
// compat_nr_pages (4.1 images); in_parent means FlagParent, no flags mean
// FlagPresent. Beyond CRIU it requires entries sorted, not overlapping,
// page aligned, inside MaxAddr and at most MaxEntries; any violation, a
// record over 1 KiB or a truncated image is an error wrapping ErrImage.
func ReadPagemap(r io.Reader) (*Pagemap, error) { return readPagemap(r, MaxEntries) }

func readPagemap(r io.Reader, maxEntries int) (*Pagemap, error) {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: magic: %w", ErrImage, err)
	}
	if c, m := binary.LittleEndian.Uint32(hdr[0:4]), binary.LittleEndian.Uint32(hdr[4:8]); c != magicImgCommon || m != magicPagemap {
		return nil, fmt.Errorf("%w: magic %#x %#x, want %#x %#x", ErrImage, c, m, magicImgCommon, magicPagemap)
	}
	buf := make([]byte, maxRecordBytes)
	rec, err := readRecord(r, buf)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("%w: head: %w", ErrImage, err)
	}
	var head pmimg.PagemapHead
	if err := proto.Unmarshal(rec, &head); err != nil {
		return nil, fmt.Errorf("%w: head: %w", ErrImage, err)
	}
	m := &Pagemap{PagesID: head.GetPagesId()}
	var end uint64 // of the previous entry
	for {
		rec, err := readRecord(r, buf)
		if errors.Is(err, io.EOF) {
			return m, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: entry %d: %w", ErrImage, len(m.Entries), err)
		}
		if len(m.Entries) == maxEntries {
			return nil, fmt.Errorf("%w: more than %d entries", ErrImage, maxEntries)
		}
		e, err := decodeEntry(rec)
		if err != nil {
			return nil, fmt.Errorf("%w: entry %d: %w", ErrImage, len(m.Entries), err)
		}
		if e.Vaddr < end {
			return nil, fmt.Errorf("%w: entry %d at %#x overlaps or precedes the one before (ends %#x)",
				ErrImage, len(m.Entries), e.Vaddr, end)
		}
		end = e.Vaddr + e.NrPages*PageSize // bounded by checkRange in decodeEntry
		m.Entries = append(m.Entries, e)
	}
}

// readRecord reads one [u32 size][bytes] record into buf (of
// maxRecordBytes). io.EOF only at a record boundary.
func readRecord(r io.Reader, buf []byte) ([]byte, error) {
	var sz [4]byte
	if _, err := io.ReadFull(r, sz[:]); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint32(sz[:])
	if n > uint32(len(buf)) {
		return nil, fmt.Errorf("record of %d bytes, at most %d", n, len(buf))
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf[:n], nil
}

func decodeEntry(rec []byte) (Entry, error) {
	var pe pmimg.PagemapEntry
	if err := proto.Unmarshal(rec, &pe); err != nil {
		return Entry{}, err
	}
	e := Entry{Vaddr: pe.GetVaddr(), NrPages: uint64(pe.GetCompatNrPages()), Flags: pe.GetFlags()}
	if pe.NrPages != nil {
		e.NrPages = pe.GetNrPages()
	}
	// As CRIU's init_compat_pagemap_entry.
	if pe.GetInParent() {
		e.Flags |= FlagParent
	} else if pe.Flags == nil {
		e.Flags = FlagPresent
	}
	if !validFlags(e.Flags) {
		return Entry{}, fmt.Errorf("flags %#x", e.Flags)
	}
	if err := checkRange(e.Vaddr, e.NrPages); err != nil {
		return Entry{}, err
	}
	return e, nil
}

// appendPagemap appends the pagemap image of m to b, as CRIU 4.2 writes it:
// nr_pages in field 5 and the required compat_nr_pages (field 2) at 0.
func appendPagemap(b []byte, m *Pagemap) ([]byte, error) {
	b = binary.LittleEndian.AppendUint32(b, magicImgCommon)
	b = binary.LittleEndian.AppendUint32(b, magicPagemap)
	b, err := appendRecord(b, &pmimg.PagemapHead{PagesId: proto.Uint32(m.PagesID)})
	if err != nil {
		return nil, err
	}
	for _, e := range m.Entries {
		b, err = appendRecord(b, &pmimg.PagemapEntry{
			Vaddr:         proto.Uint64(e.Vaddr),
			CompatNrPages: proto.Uint32(0),
			Flags:         proto.Uint32(e.Flags),
			NrPages:       proto.Uint64(e.NrPages),
		})
		if err != nil {
			return nil, err
		}
	}
	return b, nil
}

func appendRecord(b []byte, msg proto.Message) ([]byte, error) {
	at := len(b)
	b = append(b, 0, 0, 0, 0)
	b, err := proto.MarshalOptions{Deterministic: true}.MarshalAppend(b, msg)
	if err != nil {
		return nil, fmt.Errorf("encode %T: %w", msg, err)
	}
	binary.LittleEndian.PutUint32(b[at:], uint32(len(b)-at-4))
	return b, nil
}

// EncodePagemap returns the pagemap image of m as CRIU 4.2 writes it.
func EncodePagemap(m *Pagemap) ([]byte, error) { return appendPagemap(nil, m) }

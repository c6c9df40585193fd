package pagestore

import (
	"slices"
	"sync"
)

// slot is one recorded page: its PE flags in bits 0-2, slotValid, slotZero,
// and for a page with data its spool offset (a multiple of PageSize) in the
// bits above. The zero slot is a page never recorded.
type slot uint64

const (
	slotValid  slot = 1 << 3 // the page is recorded
	slotZero   slot = 1 << 4 // a present page that is all zeros: no data
	slotFinal  slot = 1 << 5 // recorded or kept since BeginFinal
	slotOffset      = ^slot(PageSize - 1)
)

func (s slot) valid() bool   { return s&slotValid != 0 }
func (s slot) flags() uint32 { return uint32(s) & flagsMask }
func (s slot) present() bool { return s.flags()&FlagPresent != 0 }
func (s slot) hasData() bool { return s.valid() && s.present() && s&slotZero == 0 }
func (s slot) isZero() bool  { return s.valid() && s.present() && s&slotZero != 0 }

// content: the page has bytes in the pages image (data, or zeros as a
// hole), unlike a lazy or parent page.
func (s slot) content() bool { return s.valid() && s.present() }
func (s slot) offset() int64 { return int64(s & slotOffset) }
func (s slot) final() bool   { return s&slotFinal != 0 }
func dataSlot(flags uint32, off int64) slot {
	return slot(off)&slotOffset | slotValid | slot(flags)
}
func plainSlot(flags uint32, zero bool) slot {
	s := slotValid | slot(flags)
	if zero {
		s |= slotZero
	}
	return s
}

// chunkPages pages (2 MiB) share one chunk of the index.
const (
	chunkShift = 9
	chunkPages = 1 << chunkShift
)

type chunk [chunkPages]slot

// chunkBytes is what one chunk of index costs.
const chunkBytes = chunkPages * 8

// pagemap is the index of one key.
type pagemap struct {
	key    Key
	mu     sync.RWMutex
	chunks map[uint64]*chunk // guarded by mu; by page number >> chunkShift
	counts Counts            // guarded by mu
	// sp holds the key's page data: its own spool, or one shared by the
	// keys beyond maxOwnSpools (own is false).
	sp  *spool
	own bool
	// While ordered (guarded by mu), own spool holds every page with
	// content (data, or zero as a hole) at the offset it has in the pages
	// image: pages came in address order and only data replaced data. Then
	// Commit links the spool as the image instead of copying it. end is
	// the image size so far, next the page number after the last page with
	// content, flushed the bytes handed to writeback.
	ordered      bool
	end, flushed int64
	next         uint64
	// parent is the layout the spool had when the order broke, with
	// Config.Levels (guarded by mu); nil before.
	parent *level
	// cached chunk of the last lookup; guarded by mu (write side only).
	lastIdx   uint64
	lastChunk *chunk
}

func newPagemap(k Key, sp *spool, own bool) *pagemap {
	return &pagemap{key: k, chunks: make(map[uint64]*chunk), sp: sp, own: own, ordered: own}
}

// get returns the slot of page number pn. Callers hold mu (read or write).
func (p *pagemap) get(pn uint64) slot {
	c := p.chunks[pn>>chunkShift]
	if c == nil {
		return 0
	}
	return c[pn&(chunkPages-1)]
}

// ref returns the slot of pn for writing, creating its chunk. Callers hold
// mu for writing.
func (p *pagemap) ref(pn uint64) *slot {
	idx := pn >> chunkShift
	if p.lastChunk == nil || p.lastIdx != idx {
		c := p.chunks[idx]
		if c == nil {
			c = new(chunk)
			p.chunks[idx] = c
		}
		p.lastIdx, p.lastChunk = idx, c
	}
	return &p.lastChunk[pn&(chunkPages-1)]
}

// scanImage calls fn for every page the images hold, in address order
// until fn returns false: every recorded page, or with final only those
// recorded or kept since BeginFinal. Callers hold mu.
func (p *pagemap) scanImage(final bool, fn func(pn uint64, s slot) bool) {
	p.scan(func(pn uint64, s slot) bool {
		if final && !s.final() {
			return true
		}
		return fn(pn, s)
	})
}

// scan calls fn for every recorded page in address order until fn returns
// false. Callers hold mu.
func (p *pagemap) scan(fn func(pn uint64, s slot) bool) {
	idxs := make([]uint64, 0, len(p.chunks))
	for idx := range p.chunks {
		idxs = append(idxs, idx)
	}
	slices.Sort(idxs)
	for _, idx := range idxs {
		c := p.chunks[idx]
		for i, s := range c {
			if s.valid() && !fn(idx<<chunkShift|uint64(i), s) {
				return
			}
		}
	}
}

// count moves s from or to its class in c.
func (c *Counts) count(s slot, delta uint64) {
	if !s.valid() {
		return
	}
	c.Pages += delta
	switch {
	case s.hasData():
		c.DataPages += delta
		c.Bytes += delta * PageSize
	case s.isZero():
		c.ZeroPages += delta
	case s.flags() == FlagParent:
		c.ParentPages += delta
	default:
		c.LazyPages += delta
	}
}

func (c *Counts) add(o Counts) {
	c.Pages += o.Pages
	c.DataPages += o.DataPages
	c.ZeroPages += o.ZeroPages
	c.LazyPages += o.LazyPages
	c.ParentPages += o.ParentPages
	c.Replaced += o.Replaced
	c.Bytes += o.Bytes
}

// run is a range of consecutive recorded pages with equal flags: one
// pagemap entry.
type run struct {
	first, n uint64 // page numbers
	flags    uint32
}

// runs returns the pagemap entries of p in address order (see scanImage);
// pages whose newest copy parent holds (nil: none) are PE_PARENT. Callers
// hold mu.
func (p *pagemap) runs(final bool, parent *level) []run {
	var out []run
	p.scanImage(final, func(pn uint64, s slot) bool {
		flags := s.flags()
		if parent.holds(pn, s) {
			flags = FlagParent
		}
		if n := len(out); n > 0 && out[n-1].first+out[n-1].n == pn && out[n-1].flags == flags {
			out[n-1].n++
		} else {
			out = append(out, run{first: pn, n: 1, flags: flags})
		}
		return true
	})
	return out
}

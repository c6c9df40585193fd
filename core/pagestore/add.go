package pagestore

import (
	"bytes"
	"fmt"
	"sync/atomic"

	"github.com/phaul/phaul/core/linux"
)

// Add records nrPages pages at vaddr (a page address, or the offset in the
// segment for KindShmem) with CRIU's PE flags: FlagPresent, FlagPresent|
// FlagLazy, FlagLazy or FlagParent. With FlagPresent, data holds exactly
// nrPages*PageSize bytes, which Add copies (a page of zeros is kept as a
// zero page: no bytes); otherwise data must be empty. Each page replaces
// any older record of it. An unopened key is opened. Errors: ErrInvalid
// (nothing recorded), ErrLimit (nothing recorded), ErrCommitted, ErrClosed,
// ErrBroken.
func (s *Store) Add(k Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	if err := s.checkAdd(k, vaddr, nrPages, flags, data); err != nil {
		return fmt.Errorf("add %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	if err := s.add(k, vaddr, nrPages, flags, data); err != nil {
		return fmt.Errorf("add %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	return nil
}

// AddZero records nrPages present pages at vaddr known to be all zeros,
// without their bytes. Errors as for Add.
func (s *Store) AddZero(k Key, vaddr, nrPages uint64) error {
	if err := s.checkPages(k, vaddr, nrPages); err != nil {
		return fmt.Errorf("add zero %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	if err := s.add(k, vaddr, nrPages, FlagPresent, nil); err != nil {
		return fmt.Errorf("add zero %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	return nil
}

// checkPages bounds a range to record before anything is looked at.
func (s *Store) checkPages(k Key, vaddr, nrPages uint64) error {
	if err := k.validate(); err != nil {
		return err
	}
	if err := checkRange(vaddr, nrPages); err != nil {
		return err
	}
	if nrPages > s.cfg.MaxPages {
		return fmt.Errorf("%w: %d pages, at most %d recorded", ErrLimit, nrPages, s.cfg.MaxPages)
	}
	return nil
}

func (s *Store) checkAdd(k Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	if err := s.checkPages(k, vaddr, nrPages); err != nil {
		return err
	}
	if !validFlags(flags) {
		return fmt.Errorf("%w: flags %#x", ErrInvalid, flags)
	}
	if flags&FlagPresent != 0 {
		// nrPages*PageSize <= MaxAddr: checked above, no overflow.
		if uint64(len(data)) != nrPages*PageSize {
			return fmt.Errorf("%w: %d bytes of data for %d pages", ErrInvalid, len(data), nrPages)
		}
	} else if len(data) != 0 {
		return fmt.Errorf("%w: %d bytes of data with flags %#x", ErrInvalid, len(data), flags)
	}
	return nil
}

// zeroPage is never written.
var zeroPage [PageSize]byte

// add records a checked range. data == nil with FlagPresent: zero pages.
func (s *Store) add(k Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.writable(); err != nil {
		return err
	}
	if err := s.walk(nrPages); err != nil {
		return err
	}
	p, err := s.open(k)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()

	// Which pages carry bytes: non-zero present ones. len(data) bounds
	// nrPages here.
	var withData []bool
	if data != nil {
		withData = make([]bool, nrPages)
		for i := range withData {
			withData[i] = !bytes.Equal(data[i*PageSize:(i+1)*PageSize], zeroPage[:])
		}
	}
	first := vaddr >> pageShift

	// Count first, so that a range over a limit changes nothing. And see
	// whether the range keeps p's spool in image order (pagemap.ordered).
	var newPages, newData, freed, newChunks uint64
	ordered, next := p.ordered, p.next
	cur := cursor{p: p}
	for i := range nrPages {
		pn := first + i
		if i == 0 || pn&(chunkPages-1) == 0 {
			if p.chunks[pn>>chunkShift] == nil {
				newChunks++
			}
		}
		old := cur.get(pn)
		nd := withData != nil && withData[i]
		content := flags&FlagPresent != 0
		if !old.valid() {
			newPages++
		}
		if nd && !old.hasData() {
			newData++
		}
		if !nd && old.hasData() {
			freed++
		}
		if ordered {
			switch {
			case !old.valid() && content:
				ordered = pn >= next // after every page with content
				next = pn + 1
			case !old.valid():
				// No content, no place in the image.
			default:
				// In place: data over data, zero over zero, no
				// content over none.
				ordered = old.hasData() == nd && old.content() == content
			}
		}
	}
	if !reserve(&s.chunks, newChunks, s.cfg.MaxIndexBytes/chunkBytes) {
		return fmt.Errorf("%w: %d more bytes of page index, at most %d", ErrLimit, newChunks*chunkBytes, s.cfg.MaxIndexBytes)
	}
	if !reserve(&s.pages, newPages, s.cfg.MaxPages) {
		s.chunks.Add(-newChunks)
		return fmt.Errorf("%w: %d more pages recorded, at most %d", ErrLimit, newPages, s.cfg.MaxPages)
	}
	if newData > freed && !reserve(&s.dataPages, newData-freed, s.cfg.MaxBytes/PageSize) {
		s.pages.Add(-newPages)
		s.chunks.Add(-newChunks)
		return fmt.Errorf("%w: %d more bytes held, at most %d", ErrLimit, (newData-freed)*PageSize, s.cfg.MaxBytes)
	}
	if freed > newData {
		s.dataPages.Add(-(freed - newData))
	}

	if p.ordered && !ordered {
		s.log.Debug("spool out of image order", "key", k, "vaddr", fmt.Sprintf("%#x", vaddr), "pages", nrPages,
			"image_bytes", p.end, "next", fmt.Sprintf("%#x", p.next<<pageShift))
		if s.cfg.Levels && p.parent == nil {
			p.parent = p.snapshotLevel()
		}
	}
	var offs []int64
	if !ordered {
		offs = p.sp.alloc(int(newData), make([]int64, 0, newData))
	}
	end := p.end
	writes := make([]pageCopy, 0, newData)
	var released []int64
	for i := range nrPages {
		ref := p.ref(first + i)
		old := *ref
		var ns slot
		switch nd := withData != nil && withData[i]; {
		case nd && old.hasData():
			ns = dataSlot(flags, old.offset()) // newest copy overwrites in place
			writes = append(writes, pageCopy{off: old.offset(), buf: int(i)})
		case nd && ordered:
			ns = dataSlot(flags, end) // its place in the image
			writes = append(writes, pageCopy{off: end, buf: int(i)})
			end += PageSize
		case nd:
			ns = dataSlot(flags, offs[0])
			writes = append(writes, pageCopy{off: offs[0], buf: int(i)})
			offs = offs[1:]
		default:
			ns = plainSlot(flags, flags&FlagPresent != 0)
			if old.hasData() {
				released = append(released, old.offset())
			}
			if ordered && !old.valid() && ns.content() {
				end += PageSize // a zero page: a hole in the image
			}
		}
		if s.final {
			ns |= slotFinal
		}
		if old.valid() {
			p.counts.Replaced++
		}
		p.counts.count(old, ^uint64(0)) // minus one
		p.counts.count(ns, 1)
		*ref = ns
	}
	if ordered {
		p.end, p.next = end, next
		p.sp.grow(end)
	}
	p.ordered = ordered
	p.sp.release(released...)
	if err := p.sp.writePages(data, writes); err != nil {
		// The index already points at slots holding a torn mix.
		s.broken.Store(true)
		return fmt.Errorf("%w: %w", ErrBroken, err)
	}
	if ordered && !s.cfg.NoSync && p.end-p.flushed >= writebackChunk {
		// A hint: an error here costs only the fsync's time later.
		if err := linux.StartWriteback(p.sp.f, p.flushed, p.end-p.flushed); err != nil {
			s.log.Debug("writeback", "key", k, "err", err)
		}
		p.flushed = p.end
	}
	return nil
}

// reserve adds n to c unless that would exceed max.
func reserve(c *atomic.Uint64, n, max uint64) bool {
	for {
		cur := c.Load()
		if n > max || cur > max-n {
			return false
		}
		if c.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

// walkPasses bounds the pages all adds and keeps of a store may walk, in
// passes over MaxPages: a frame over a range already recorded costs CPU
// (about 1.3 s for 2^26 pages here) and records nothing new, so without
// it a peer could repeat one for ever. Pre-copy resends at most the tree
// once a round, 30 rounds at most by default.
const walkPasses = 64

// walk counts n pages walked against the bound.
func (s *Store) walk(n uint64) error {
	if !reserve(&s.walked, n, walkPasses*s.cfg.MaxPages) {
		return fmt.Errorf("%w: more than %d pages walked (%d passes over the page bound)", ErrLimit, walkPasses*s.cfg.MaxPages, walkPasses)
	}
	return nil
}

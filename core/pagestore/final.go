package pagestore

import "fmt"

// BeginFinal starts the final set: from now on every page Add records, and
// every page Keep names, belongs to it, and Commit writes only the final
// set. Pre-copy sends pages over several rounds while the process runs;
// its final dump then names every page the frozen process has, and a page
// recorded earlier but not named since (unmapped, dropped) must not reach
// the images: CRIU would find no mapping for it. Calling it again is a
// no-op.
func (s *Store) BeginFinal() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writable(); err != nil {
		return fmt.Errorf("begin final: %w", err)
	}
	s.final = true
	return nil
}

// Keep puts nrPages recorded pages at vaddr into the final set as they are
// (see BeginFinal). A page never recorded is ErrNotFound, and then nothing
// is kept.
func (s *Store) Keep(k Key, vaddr, nrPages uint64) error {
	if err := s.checkPages(k, vaddr, nrPages); err != nil {
		return fmt.Errorf("keep %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.writable(); err != nil {
		return fmt.Errorf("keep %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	if err := s.walk(nrPages); err != nil {
		return fmt.Errorf("keep %v %#x+%d: %w", k, vaddr, nrPages, err)
	}
	if !s.final {
		return fmt.Errorf("keep %v %#x+%d: %w: before BeginFinal", k, vaddr, nrPages, ErrInvalid)
	}
	p := s.pagemap(k)
	if p == nil {
		return fmt.Errorf("keep %v %#x+%d: %w", k, vaddr, nrPages, ErrNotFound)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	first := vaddr >> pageShift
	cur := cursor{p: p}
	for i := range nrPages {
		if !cur.get(first + i).valid() {
			return fmt.Errorf("keep %v %#x: %w", k, (first+i)<<pageShift, ErrNotFound)
		}
	}
	for i := range nrPages {
		*p.ref(first + i) |= slotFinal
	}
	return nil
}

// dropsContent reports whether a page with content lies outside the final
// set. Callers hold p.mu.
func (p *pagemap) dropsContent() bool {
	drops := false
	p.scan(func(_ uint64, s slot) bool {
		drops = s.content() && !s.final()
		return !drops
	})
	return drops
}

package pagestore

import (
	"slices"
)

// level is the pages image a spool held while it was ordered, taken when
// the order broke (see Config.Levels): its runs of pages with content in
// address order with their flags, each at the byte offset start[i] of the
// spool.
type level struct {
	runs  []run
	start []int64
	end   int64 // image size: the spool bytes the level covers
}

// snapshotLevel returns p's current image layout: its runs of pages with
// content (the PE_PRESENT ones) placed one after the other. Callers hold
// p.mu for writing, with p.ordered still true.
func (p *pagemap) snapshotLevel() *level {
	lv := &level{}
	for _, r := range p.runs(false, nil) {
		if r.flags&FlagPresent == 0 {
			continue // no content, no place in the image
		}
		lv.runs = append(lv.runs, r)
		lv.start = append(lv.start, lv.end)
		lv.end += int64(r.n) * PageSize
	}
	return lv
}

// offset returns where the level holds page pn.
func (lv *level) offset(pn uint64) (int64, bool) {
	i, found := slices.BinarySearchFunc(lv.runs, pn, func(r run, pn uint64) int {
		switch {
		case r.first+r.n <= pn:
			return -1
		case r.first > pn:
			return 1
		}
		return 0
	})
	if !found {
		return 0, false
	}
	return lv.start[i] + int64(pn-lv.runs[i].first)*PageSize, true
}

// holds reports whether the level's copy of a page is its newest: the page
// has data and its slot is still the one the level placed it in (a newer
// copy overwrote it in place, or nothing touched it).
func (lv *level) holds(pn uint64, s slot) bool {
	if lv == nil || !s.hasData() {
		return false
	}
	off, ok := lv.offset(pn)
	return ok && off == s.offset()
}

// entries returns the pagemap entries of runs.
func entries(runs []run) []Entry {
	out := make([]Entry, 0, len(runs))
	for _, r := range runs {
		out = append(out, Entry{Vaddr: r.first << pageShift, NrPages: r.n, Flags: r.flags})
	}
	return out
}

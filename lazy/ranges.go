package lazy

import (
	"slices"
	"sort"
)

// pageSize is the page size of CRIU images and userfaultfd on amd64.
const pageSize = 4096

// seg is a run of lazy pages still missing in a task: [start, end) in the
// task's address space as it is now, holding the image's pages from img on
// (img differs from start once mremap moved the run).
type seg struct{ start, end, img uint64 }

func (s seg) pages() uint64 { return (s.end - s.start) / pageSize }

// segs is the set of a task's missing lazy pages: runs sorted by start,
// neither overlapping nor empty. moved is false while every run's img equals
// its start, so image addresses can be searched like task addresses.
type segs struct {
	runs  []seg
	pages uint64
	moved bool
}

// add appends s, which must start at or after the end of the last run.
func (p *segs) add(s seg) {
	if s.end <= s.start {
		return
	}
	p.runs = append(p.runs, s)
	p.pages += s.pages()
	p.moved = p.moved || s.img != s.start
}

func (p *segs) clone() segs {
	return segs{runs: slices.Clone(p.runs), pages: p.pages, moved: p.moved}
}

// first returns the index of the first run ending after addr.
func (p *segs) first(addr uint64) int {
	return sort.Search(len(p.runs), func(i int) bool { return p.runs[i].end > addr })
}

// find returns the run holding addr.
func (p *segs) find(addr uint64) (seg, bool) {
	i := p.first(addr)
	if i < len(p.runs) && p.runs[i].start <= addr {
		return p.runs[i], true
	}
	return seg{}, false
}

// cut removes [start, end) and returns the pages it removed.
func (p *segs) cut(start, end uint64) uint64 {
	i := p.first(start)
	j := i
	var keep []seg // at most the two ends of the cut
	var removed uint64
	for ; j < len(p.runs) && p.runs[j].start < end; j++ {
		r := p.runs[j]
		if r.start < start {
			keep = append(keep, seg{r.start, start, r.img})
		}
		if r.end > end {
			keep = append(keep, seg{end, r.end, r.img + (end - r.start)})
		}
		removed += (min(r.end, end) - max(r.start, start)) / pageSize
	}
	if i == j {
		return 0
	}
	p.runs = slices.Replace(p.runs, i, j, keep...)
	p.pages -= removed
	return removed
}

// move follows mremap of [from, from+n) to to: the missing pages there
// move with their image addresses; any missing pages at the destination
// are gone (mremap unmapped them).
func (p *segs) move(from, to, n uint64) {
	var moving []seg
	for i := p.first(from); i < len(p.runs) && p.runs[i].start < from+n; i++ {
		r := p.runs[i]
		s, e := max(r.start, from), min(r.end, from+n)
		moving = append(moving, seg{s - from + to, e - from + to, r.img + (s - r.start)})
	}
	p.cut(from, from+n)
	p.cut(to, to+n)
	if len(moving) == 0 {
		return
	}
	i := p.first(to)
	p.runs = slices.Insert(p.runs, i, moving...)
	for _, s := range moving {
		p.pages += s.pages()
	}
	p.moved = true
}

// mapped returns the first missing piece whose image addresses overlap
// [lo, hi), clipped to them: where the image's pages lo..hi belong now.
func (p *segs) mapped(lo, hi uint64) (seg, bool) {
	clip := func(r seg) (seg, bool) {
		s, e := max(r.img, lo), min(r.img+(r.end-r.start), hi)
		if s >= e {
			return seg{}, false
		}
		return seg{r.start + (s - r.img), r.start + (e - r.img), s}, true
	}
	if !p.moved {
		if i := p.first(lo); i < len(p.runs) {
			return clip(p.runs[i])
		}
		return seg{}, false
	}
	for _, r := range p.runs {
		if c, ok := clip(r); ok {
			return c, true
		}
	}
	return seg{}, false
}

// from returns the missing pages at addr, or else the nearest run after
// it, or else the first run: where the background fill goes on.
func (p *segs) from(addr uint64) (seg, bool) {
	if len(p.runs) == 0 {
		return seg{}, false
	}
	i := p.first(addr)
	if i == len(p.runs) {
		i = 0
	}
	r := p.runs[i]
	if r.start < addr && addr < r.end {
		r.img += addr - r.start
		r.start = addr
	}
	return r, true
}

package phaul

import (
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/pagestore"
)

// Write protection with WP_UNPOPULATED (which the uffd-wp tracker's
// WP_ASYNC implies) leaves a marker in every page table entry of a tracked
// range that has no page: never populated, or zapped since (MADV_DONTNEED).
// Pagemap reports a marker as a swapped page, and CRIU's dump, run while
// the tracker is armed, dumps it (zeros, or its file's content), which a
// dump of the untracked tree would not: the restored tree would hold
// memory the source's never did. The final pass drops those pages.

// findMarkers records, for every process the uffd-wp tracker follows, the
// pages of its tracked mappings that hold only a marker. It runs inside
// the freeze, after the last collect, before the last reads (sendRange
// reads a marker's page, which then maps the zero page or its file's page,
// after a lazy dump has listed it) and before the tracking is released
// (releasing removes the markers).
func (p *precopy) findMarkers() {
	p.markers = make(map[pagestore.Key]pageSet)
	for _, pr := range p.procs {
		if pr.tr == nil || pr.tr.Kind() != dirty.KindUffdWP {
			continue
		}
		ms, err := dirty.Mappings(pr.pid)
		if err != nil {
			continue // exited: nothing of it is dumped
		}
		set := make(pageSet)
		for _, r := range ms {
			for at := r.Start; at < r.End; {
				n := min(uint64(readChunk), (r.End-at)/pagestore.PageSize)
				ents := p.ents[:n]
				if err := pr.pm.Entries(at, ents); err != nil {
					break // unmapped meanwhile
				}
				for i, e := range ents {
					if e.UffdWPMarker() {
						set.add(at+uint64(i)*pagestore.PageSize, 1)
					}
				}
				at += n * pagestore.PageSize
			}
		}
		p.markers[pr.key] = set
	}
}

// pageState is what the final pass does with a page CRIU dumped.
type pageState uint8

const (
	pageNew    pageState = iota // send it
	pageKept                    // the destination has it: keep
	pageMarker                  // a tracker's marker, no data: drop
)

// state returns what becomes of page vaddr of k in the final pass.
func (p *precopy) state(k pagestore.Key, vaddr uint64) pageState {
	if m := p.markers[k]; m != nil && m.has(vaddr) {
		return pageMarker
	}
	if s := p.sent[k]; s != nil && s.has(vaddr) {
		return pageKept
	}
	return pageNew
}

package phaul

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/lazy"
)

// The final set: inside the freeze, pre-copy sends what the tree wrote
// since its last round and names every page the destination's images must
// hold, from CRIU's full final dump (finalFilter, the store of the page
// server CRIU dumps into) or from the held tree of a lazy dump
// (finalLazy). The destination's images then hold exactly the pages of
// the frozen tree.

// finalFilter is the Store of the page server CRIU's final dump writes
// into. Its first Open (every task is frozen by then) sends the last dirty
// pages; then pages the destination has already are kept, not sent.
type finalFilter struct {
	p       *precopy
	ctx     context.Context
	started bool
	err     error
}

func (f *finalFilter) Open(k pagestore.Key) (bool, error) {
	if !f.started {
		f.started = true
		f.err = f.p.final(f.ctx)
	}
	if f.err != nil {
		// Failing the OPEN fails CRIU's dump: the tree resumes.
		return false, f.err
	}
	return f.p.fw.Open(k)
}

// final runs with the tree frozen: a final-set frame, then what was
// written since the last round.
func (p *precopy) final(ctx context.Context) error {
	t0 := time.Now()
	if err := p.fw.BeginFinal(); err != nil {
		return err
	}
	if err := p.collect(); err != nil {
		return err
	}
	// Before the last reads: they map pages where markers are, but a lazy
	// dump has already listed the markers' pages.
	p.findMarkers()
	p.roundPages, p.roundBytes = 0, 0
	wire0 := p.fw.Stats().WireBytes
	if p.postcopy {
		// Fetched from the held tree after the resume.
		p.dropDirty()
	} else if err := p.sendPending(ctx); err != nil {
		return err
	}
	p.s.stats.Rounds = append(p.s.stats.Rounds, Round{Round: len(p.s.stats.Rounds) + 1, Kind: "frozen",
		DirtyPages: p.roundPages, PagesSent: p.roundPages, BytesWire: p.fw.Stats().WireBytes - wire0,
		DurationMS: ms(time.Since(t0))})
	p.s.log.Info("pre-copy final dirty set sent", "pages", p.roundPages, "dur", time.Since(t0))
	if p.s.cfg.FinalDump != FinalDumpLazy {
		// Nothing is written until the tree is gone or resumes
		// untracked; CRIU dumps the pages meanwhile.
		p.releaseTracking()
	}
	return nil
}

func (f *finalFilter) Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	if f.err != nil {
		return f.err
	}
	if flags&pagestore.FlagPresent == 0 || len(data) == 0 || (f.p.sent[k] == nil && f.p.markers[k] == nil) {
		return f.p.fw.Add(k, vaddr, nrPages, flags, data)
	}
	for i := uint64(0); i < nrPages; {
		st := f.p.state(k, vaddr+i*pagestore.PageSize)
		j := i + 1
		for j < nrPages && f.p.state(k, vaddr+j*pagestore.PageSize) == st {
			j++
		}
		var err error
		switch st {
		case pageMarker: // no data on the source: drop
		case pageKept:
			err = f.p.fw.Keep(k, vaddr+i*pagestore.PageSize, j-i)
		default:
			err = f.p.fw.Add(k, vaddr+i*pagestore.PageSize, j-i, flags, data[i*pagestore.PageSize:j*pagestore.PageSize])
		}
		if err != nil {
			return err
		}
		i = j
	}
	return nil
}

func (f *finalFilter) Read(k pagestore.Key, vaddr uint64, buf []byte) error {
	return f.p.fw.Read(k, vaddr, buf)
}

func (f *finalFilter) Commit() error {
	if f.err != nil {
		return f.err
	}
	if !f.started {
		return errors.New("pre-copy: CRIU's dump opened no pagemap")
	}
	return f.p.fw.Commit()
}

// finalLazy runs in the post-dump notification of a lazy dump, with the
// tree frozen and held by CRIU: it sends the last dirty set, then turns the
// pagemaps CRIU wrote locally into the final set (pages already sent are
// kept; the rest come from the held tree, or from the local pages images
// for the few CRIU copied), removes those images (the destination writes
// its own from the store) and ends the forward session, which the
// destination commits.
func (p *precopy) finalLazy(ctx context.Context, imagesDir string) error {
	if err := p.final(ctx); err != nil {
		return err
	}
	t0 := time.Now()
	ents, err := os.ReadDir(imagesDir)
	if err != nil {
		return err
	}
	var kept, added uint64
	if p.postcopy {
		p.remote = newRemoteSet()
	}
	for _, e := range ents {
		k, ok := pagestore.ParsePagemapName(e.Name())
		if !ok {
			continue
		}
		if err := p.finalPagemap(ctx, imagesDir, e.Name(), k, &kept, &added); err != nil {
			return fmt.Errorf("final set from %s: %w", e.Name(), err)
		}
	}
	if p.remote != nil {
		p.s.log.Info("post-copy: pages left at the source", "pages", p.remote.pages, "tasks", len(p.remote.tasks))
	}
	// The local page images must not travel: the destination's store
	// writes the complete set.
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "pagemap-") || strings.HasPrefix(e.Name(), "pages-") {
			if err := os.Remove(filepath.Join(imagesDir, e.Name())); err != nil {
				return err
			}
		}
	}
	p.s.log.Info("final set from the lazy dump", "kept_pages", kept, "added_pages", added, "dur", time.Since(t0))
	// Every read of the held tree is done: the release (which holds its
	// mm's lock) runs while the destination restores. Nothing is written
	// until the tree is gone or resumes untracked.
	p.releaseTracking()
	return p.fw.Commit()
}

// finalPagemap sends one local pagemap as final-set frames.
func (p *precopy) finalPagemap(ctx context.Context, dir, name string, k pagestore.Key, kept, added *uint64) error {
	f, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	pm, err := pagestore.ReadPagemap(f)
	f.Close()
	if err != nil {
		return err
	}
	var pages *os.File
	if pm.PresentPages() > 0 {
		if pages, err = os.Open(filepath.Join(dir, pagestore.PagesName(pm.PagesID))); err != nil {
			return err
		}
		defer pages.Close()
	}
	if _, err := p.fw.Open(k); err != nil {
		return err
	}
	pid := -1 // the process holding the lazy pages, looked up once
	// Post-copy sends the command line's and environment's pages as data:
	// other processes read them (ps), and such a read of a missing page
	// does not wait for the daemon (lazy.EagerRanges).
	var eager [][2]uint64
	if p.postcopy && k.Kind == pagestore.KindTask {
		if eager, err = lazy.EagerRanges(dir, k.ID); err != nil {
			return err
		}
	}
	isEager := func(va uint64) bool {
		for _, r := range eager {
			if va >= r[0] && va < r[1] {
				return true
			}
		}
		return false
	}
	var off int64 // in the pages image
	for _, e := range pm.Entries {
		if err := ctx.Err(); err != nil {
			return err
		}
		present := e.Flags&pagestore.FlagPresent != 0
		for i := uint64(0); i < e.NrPages; {
			vaddr := e.Vaddr + i*pagestore.PageSize
			st, eg := p.state(k, vaddr), isEager(vaddr)
			j := i + 1
			for j < e.NrPages && j-i < readChunk && p.state(k, e.Vaddr+j*pagestore.PageSize) == st &&
				isEager(e.Vaddr+j*pagestore.PageSize) == eg {
				j++
			}
			n := j - i
			buf := p.buf[:n*pagestore.PageSize]
			switch {
			case st == pageMarker:
				// No data on the source: not dumped untracked either.
			case st == pageKept:
				if err := p.fw.Keep(k, vaddr, n); err != nil {
					return err
				}
				*kept += n
			case present:
				if _, err := pages.ReadAt(buf, off+int64(i*pagestore.PageSize)); err != nil {
					return fmt.Errorf("%s: %w", pagestore.PagesName(pm.PagesID), err)
				}
				if err := p.fw.Add(k, vaddr, n, pagestore.FlagPresent, buf); err != nil {
					return err
				}
				*added += n
			default:
				// Lazy: the content is in the held tree.
				if pid < 0 {
					if pid, err = p.hostPid(k); err != nil {
						return err
					}
				}
				if p.postcopy && !eg {
					// Fetched from there after the resume.
					if err := p.fw.Add(k, vaddr, n, pagestore.FlagLazy, nil); err != nil {
						return err
					}
					p.remote.add(k.ID, pid, vaddr, n)
					break
				}
				got, err := linux.ReadProcessMemory(pid, vaddr, buf)
				if err != nil || got != len(buf) {
					return fmt.Errorf("read %d pages at %#x of %d: %d bytes, %v", n, vaddr, pid, got, err)
				}
				if err := p.fw.Add(k, vaddr, n, pagestore.FlagPresent, buf); err != nil {
					return err
				}
				*added += n
			}
			i = j
		}
		if present {
			off += int64(e.NrPages * pagestore.PageSize)
		}
	}
	return nil
}

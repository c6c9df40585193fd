package pagestore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// commitBufPages is the copy buffer of Commit: 1 MiB.
const commitBufPages = 256

// Commit writes the images `criu restore` reads into Dir (see the package
// comment for their layout and the crash guarantees): a pagemap for every
// opened key and a pages image for each. Dir is created if missing and may
// hold CRIU's other images; Commit only adds files and refuses (an error
// wrapping fs.ErrExist) when one of its names already exists in Dir, or
// when a cut-short Commit left staged files (Partial). After a successful
// Commit the store takes no more pages (ErrCommitted) but still serves
// Read; after a failed one nothing is left in Dir and pages may be added
// again.
func (s *Store) Commit() error {
	dir := s.cfg.Dir
	start := time.Now()
	s.mu.Lock()
	if err := s.writable(); err != nil {
		s.mu.Unlock()
		return fmt.Errorf("commit %s: %w", dir, err)
	}
	s.state = stateCommitting
	s.mu.Unlock()

	// Every Add and Open holding mu has finished and new ones fail; Reads
	// go on. Holding mu shared keeps Close away until the images are out.
	final := stateOpen
	s.mu.RLock()
	defer func() {
		s.mu.RUnlock()
		s.mu.Lock()
		if s.state == stateCommitting {
			s.state = final
		}
		s.mu.Unlock()
	}()
	if err := s.usable(); err != nil { // closed in between
		return fmt.Errorf("commit %s: %w", dir, err)
	}
	files, err := s.stage()
	if err != nil {
		return fmt.Errorf("commit %s: %w", dir, err)
	}
	if err := install(dir, files, !s.cfg.NoSync); err != nil {
		return fmt.Errorf("commit %s: %w", dir, err)
	}
	final = stateCommitted
	st := s.Stats()
	s.log.Info("pages committed", "keys", len(st.Keys), "pages", st.Pages, "zero_pages", st.ZeroPages,
		"bytes", st.Bytes, "dur", time.Since(start))
	return nil
}

// stage writes every image into the staging directory and returns their
// names in the order to move them: pages images first, so a pagemap in Dir
// always finds its pages.
func (s *Store) stage() (names []string, err error) {
	dir, staging := s.cfg.Dir, stagingDir(s.cfg.Dir)
	left, err := Partial(dir)
	if err != nil {
		return nil, err
	}
	if len(left) > 0 {
		return nil, fmt.Errorf("a cut-short commit left %s in %s: %w", strings.Join(left, ", "), staging, fs.ErrExist)
	}
	keys := s.Keys()
	var pagemaps []string
	for i, k := range keys {
		names = append(names, pagesName(uint32(i+1)))
		pagemaps = append(pagemaps, k.pagemapName())
	}
	names = append(names, pagemaps...)
	for _, name := range names {
		_, err := os.Lstat(filepath.Join(dir, name))
		if err == nil {
			return nil, fmt.Errorf("%s: %w", name, fs.ErrExist)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	if err := os.MkdirAll(staging, 0o700); err != nil {
		return nil, err
	}
	var created []string
	defer func() {
		if err != nil {
			for _, name := range created {
				os.Remove(filepath.Join(staging, name)) // ours; the error is already reported
			}
			os.Remove(staging) // only if empty: it may also hold the spool
		}
	}()
	buf := make([]byte, commitBufPages*PageSize)
	for i, k := range keys {
		pagesID := uint32(i + 1)
		p := s.pagemap(k)
		p.mu.RLock()
		m := &Pagemap{PagesID: pagesID}
		for _, r := range p.runs(s.final) {
			m.Entries = append(m.Entries, Entry{Vaddr: r.first << pageShift, NrPages: r.n, Flags: r.flags})
		}
		err = s.stagePages(filepath.Join(staging, pagesName(pagesID)), p, buf)
		p.mu.RUnlock()
		if err == nil || !errors.Is(err, fs.ErrExist) {
			created = append(created, pagesName(pagesID))
		}
		if err != nil {
			return nil, err
		}
		img, err := appendPagemap(nil, m)
		if err != nil {
			return nil, err
		}
		err = writeFile(filepath.Join(staging, k.pagemapName()), img, !s.cfg.NoSync)
		if err == nil || !errors.Is(err, fs.ErrExist) {
			created = append(created, k.pagemapName())
		}
		if err != nil {
			return nil, err
		}
	}
	if !s.cfg.NoSync {
		if err := syncDir(staging); err != nil {
			return nil, err
		}
	}
	return names, nil
}

// stagePages puts the pages image of p at path: its spool itself when that
// holds the pages in image order (pagemap.ordered), else a copy. Callers
// hold p.mu.
func (s *Store) stagePages(path string, p *pagemap, buf []byte) error {
	if drops := s.final && p.dropsContent(); !p.ordered || !p.sp.linkable || drops {
		s.log.Debug("pages image copied, not linked", "key", p.key, "in_order", p.ordered,
			"tmpfile", p.sp.linkable, "drops_pages", drops)
		return s.writePages(path, p, buf)
	}
	f := p.sp.f
	// Trailing zero pages: extend the file over them as a hole.
	if err := f.Truncate(p.end); err != nil {
		return err
	}
	if !s.cfg.NoSync {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	err := linux.LinkTmpfile(f, path)
	if errors.Is(err, syscall.EXDEV) {
		// The spool dir is on another filesystem.
		return s.writePages(path, p, buf)
	}
	return err
}

// writePages writes the pages image of p into a new file: its present
// pages in address order, zero pages as holes. Callers hold p.mu.
func (s *Store) writePages(path string, p *pagemap, buf []byte) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	var (
		pos      int64 // file offset of the next page
		bufStart int64 // file offset of buf's first page
		reads    []pageCopy
	)
	flush := func() error {
		if len(reads) == 0 {
			return nil
		}
		n := len(reads)
		if err := p.sp.readPages(buf, reads); err != nil {
			return fmt.Errorf("spool: %w", err)
		}
		reads = reads[:0]
		_, err := f.WriteAt(buf[:n*PageSize], bufStart)
		return err
	}
	p.scanImage(s.final, func(pn uint64, sl slot) bool {
		switch {
		case sl.hasData():
			if len(reads) == 0 {
				bufStart = pos
			}
			reads = append(reads, pageCopy{off: sl.offset(), buf: len(reads)})
			if len(reads) == commitBufPages {
				err = flush()
			}
		case sl.isZero():
			err = flush() // leave a hole
		default:
			return true // no content in this level
		}
		pos += PageSize
		return err == nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return err
	}
	// Trailing zero pages: extend the file over them as a hole.
	if err := f.Truncate(pos); err != nil {
		return err
	}
	if s.cfg.NoSync {
		return nil
	}
	return f.Sync()
}

func writeFile(path string, data []byte, durable bool) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if !durable {
		return nil
	}
	return f.Sync()
}

// install moves the staged names into dir without overwriting (link, then
// unlink the staged name) and fsyncs dir. On failure it removes what it
// linked and the staged files.
func install(dir string, names []string, durable bool) (err error) {
	staging := stagingDir(dir)
	var linked []string
	defer func() {
		if err != nil {
			for _, name := range linked {
				os.Remove(filepath.Join(dir, name)) // ours; the error is already reported
			}
			syncDir(dir)
		}
		if err != nil || len(linked) == len(names) {
			for _, name := range names {
				os.Remove(filepath.Join(staging, name))
			}
			os.Remove(staging) // only if empty: it may also hold the spool
		}
	}()
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		if err := syncDir(filepath.Dir(dir)); err != nil {
			return err
		}
	}
	for _, name := range names {
		if err := os.Link(filepath.Join(staging, name), filepath.Join(dir, name)); err != nil {
			return err
		}
		linked = append(linked, name)
	}
	if !durable {
		return nil
	}
	return syncDir(dir)
}

func syncDir(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Partial returns the image names a cut-short Commit into dir left in its
// staging directory (dir + ".partial"), sorted. An empty list means no
// commit into dir was interrupted; otherwise dir may hold a part of the
// set (pages images before their pagemaps) and must not be restored from.
func Partial(dir string) ([]string, error) {
	ents, err := os.ReadDir(stagingDir(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if strings.HasSuffix(n, ".img") && (strings.HasPrefix(n, "pagemap-") || strings.HasPrefix(n, "pages-")) {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names, nil
}

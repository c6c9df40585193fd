package pagestore

import (
	"errors"
	"fmt"
	"io"
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
	plans := make([]keyPlan, len(keys))
	for i, k := range keys {
		plans[i] = s.plan(k, uint32(i+1))
	}
	// Parent level first, then pages before pagemaps: a pagemap in Dir
	// always finds what it names.
	var pagemaps []string
	for _, pl := range plans {
		if pl.parent != nil {
			names = append(names, filepath.Join(parentDir, pagesName(pl.pagesID)), filepath.Join(parentDir, pl.p.key.pagemapName()))
		}
	}
	for _, pl := range plans {
		names = append(names, pagesName(pl.pagesID))
		pagemaps = append(pagemaps, pl.p.key.pagemapName())
	}
	names = append(names, pagemaps...)
	check := names
	if slices.ContainsFunc(plans, func(pl keyPlan) bool { return pl.parent != nil }) {
		check = append([]string{parentDir}, names...)
	}
	for _, name := range check {
		_, err := os.Lstat(filepath.Join(dir, name))
		if err == nil {
			return nil, fmt.Errorf("%s: %w", name, fs.ErrExist)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	if err := makeOwnDir(staging); err != nil {
		return nil, err
	}
	var created []string
	defer func() {
		if err != nil {
			for _, name := range created {
				os.Remove(filepath.Join(staging, name)) // ours; the error is already reported
			}
			os.Remove(filepath.Join(staging, parentDir))
			os.Remove(staging) // only if empty: it may also hold the spool
		}
	}()
	// create runs write for a new staged file and records it for cleanup.
	create := func(name string, write func(path string) error) error {
		err := write(filepath.Join(staging, name))
		if err == nil || !errors.Is(err, fs.ErrExist) {
			created = append(created, name)
		}
		return err
	}
	buf := make([]byte, commitBufPages*PageSize)
	for _, pl := range plans {
		p := pl.p
		p.mu.RLock()
		err = s.stageKey(pl, buf, create)
		p.mu.RUnlock()
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

// parentDir is the parent level's directory inside Dir: CRIU's restore
// reads PE_PARENT pages from Dir/parent/.
const parentDir = "parent"

// keyPlan is how Commit writes one key's images.
type keyPlan struct {
	p       *pagemap
	pagesID uint32
	link    bool   // the spool is the pages image: link it
	parent  *level // two levels: the spool as parent/, the rest on top
	why     string // why the pages are copied, for the debug log
}

// plan decides how to write the images of k. It takes p.mu itself.
func (s *Store) plan(k Key, pagesID uint32) keyPlan {
	p := s.pagemap(k)
	p.mu.RLock()
	defer p.mu.RUnlock()
	pl := keyPlan{p: p, pagesID: pagesID}
	drops := s.final && p.dropsContent()
	switch {
	case !p.sp.linkable:
		pl.why = "spool is not a tmpfile"
	case p.ordered && !drops:
		pl.link = true
	case !s.cfg.Levels || k.Kind != KindTask || p.counts.ParentPages > 0:
		pl.why = fmt.Sprintf("in_order=%v drops_pages=%v", p.ordered, drops)
	case p.ordered:
		pl.parent = p.snapshotLevel() // pages left the final set
	case p.parent != nil:
		pl.parent = p.parent
	default:
		pl.why = "shared spool"
	}
	return pl
}

// stageKey stages the images of one key through create. Callers hold
// pl.p.mu.
func (s *Store) stageKey(pl keyPlan, buf []byte, create func(string, func(string) error) error) error {
	p := pl.p
	stagePagemap := func(name string, m *Pagemap) error {
		img, err := appendPagemap(nil, m)
		if err != nil {
			return err
		}
		return create(name, func(path string) error {
			return writeFile(path, img, !s.cfg.NoSync)
		})
	}
	if pl.parent != nil {
		err := create(filepath.Join(parentDir, pagesName(pl.pagesID)), func(path string) error {
			if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
				return err
			}
			return s.linkSpool(p, path, pl.parent.end, false)
		})
		if err != nil {
			return err
		}
		err = stagePagemap(filepath.Join(parentDir, p.key.pagemapName()), &Pagemap{PagesID: pl.pagesID, Entries: entries(pl.parent.runs)})
		if err != nil {
			return err
		}
	}
	err := create(pagesName(pl.pagesID), func(path string) error {
		if pl.link {
			return s.linkSpool(p, path, p.end, true)
		}
		if pl.why != "" {
			s.log.Debug("pages image copied, not linked", "key", p.key, "why", pl.why)
		}
		return s.writePages(path, p, pl.parent, buf)
	})
	if err != nil {
		return err
	}
	return stagePagemap(p.key.pagemapName(), &Pagemap{PagesID: pl.pagesID, Entries: entries(p.runs(s.final, pl.parent))})
}

// linkSpool names p's spool at path, at least size bytes long (trailing
// zero pages are a hole). exact cuts it to size: the whole spool is the
// image. The spool of a parent level may hold more than the level (pages
// placed since, read by the top level's copy). If the spool is on another
// filesystem than path, it copies the image instead. Callers hold p.mu.
func (s *Store) linkSpool(p *pagemap, path string, size int64, exact bool) error {
	f := p.sp.f
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if exact || fi.Size() < size {
		if err := f.Truncate(size); err != nil {
			return err
		}
	}
	if !s.cfg.NoSync {
		if err := f.Sync(); err != nil {
			return err
		}
	}
	err = linux.LinkTmpfile(f, path)
	if !errors.Is(err, syscall.EXDEV) {
		return err
	}
	if exact {
		return s.writePages(path, p, nil, make([]byte, commitBufPages*PageSize))
	}
	return copySpool(path, f, size, !s.cfg.NoSync)
}

// copySpool writes the first size bytes of spool file f into a new file.
func copySpool(path string, f *os.File, size int64, durable bool) (err error) {
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	if _, err := io.Copy(out, io.NewSectionReader(f, 0, size)); err != nil {
		return err
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	if !durable {
		return nil
	}
	return out.Sync()
}

// writePages writes the pages image of p into a new file: its present
// pages in address order, zero pages as holes, but for those whose newest
// copy parent holds (nil: none). Callers hold p.mu.
func (s *Store) writePages(path string, p *pagemap, parent *level, buf []byte) (err error) {
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
		case parent.holds(pn, sl):
			return true // in the parent level
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
			os.Remove(filepath.Join(dir, parentDir)) // only if empty: ours, made below
			syncDir(dir)
		}
		if err != nil || len(linked) == len(names) {
			for _, name := range names {
				os.Remove(filepath.Join(staging, name))
			}
			os.Remove(filepath.Join(staging, parentDir))
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
	subdir := false
	for _, name := range names {
		if sub := filepath.Dir(name); sub != "." && !subdir {
			// The parent level's directory; stage checked it was absent.
			if err := os.Mkdir(filepath.Join(dir, sub), 0o700); err != nil {
				return err
			}
			subdir = true
		}
		if err := os.Link(filepath.Join(staging, name), filepath.Join(dir, name)); err != nil {
			return err
		}
		linked = append(linked, name)
	}
	if !durable {
		return nil
	}
	if subdir {
		if err := syncDir(filepath.Join(dir, parentDir)); err != nil {
			return err
		}
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
		if isPagesImage(n) {
			names = append(names, n)
		}
	}
	if ents, err := os.ReadDir(filepath.Join(stagingDir(dir), parentDir)); err == nil {
		for _, e := range ents {
			if isPagesImage(e.Name()) {
				names = append(names, filepath.Join(parentDir, e.Name()))
			}
		}
	}
	slices.Sort(names)
	return names, nil
}

func isPagesImage(n string) bool {
	return strings.HasSuffix(n, ".img") && (strings.HasPrefix(n, "pagemap-") || strings.HasPrefix(n, "pages-"))
}

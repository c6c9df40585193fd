package lazy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/phaul/phaul/core/pagestore"
)

// ImageSource is a Source reading the pages of an images dir: for task id,
// pagemap-<id>.img says where each PE_PRESENT range lies in
// pages-<pages_id>.img; ranges without content there come from the parent
// level (parent/pagemap-<id>.img and its pages image), where MarkImages
// left them lazy. Safe for concurrent use; Close releases its files.
type ImageSource struct {
	dir string

	mu     sync.Mutex
	tasks  map[uint64]*imageTask // guarded by mu
	closed bool                  // guarded by mu
}

// imageTask is one task's pages: sorted runs of its pages images.
type imageTask struct {
	runs  []imageRun
	files []*os.File // the pages images the runs read
}

// imageRun is [vaddr, end) of a task, at off in pages image f.
type imageRun struct {
	vaddr, end uint64
	off        int64
	f          *os.File
}

// NewImageSource returns a Source over the images in dir. Images are read
// on first use.
func NewImageSource(dir string) *ImageSource {
	return &ImageSource{dir: dir, tasks: make(map[uint64]*imageTask)}
}

// ReadPages implements Source. A page without content in the dir is an
// error wrapping ErrNoPage.
func (s *ImageSource) ReadPages(ctx context.Context, id uint64, vaddr uint64, buf []byte) error {
	if vaddr%pageSize != 0 || len(buf)%pageSize != 0 {
		return fmt.Errorf("lazy: read %d bytes at %#x: not whole pages", len(buf), vaddr)
	}
	it, err := s.task(id)
	if err != nil {
		return err
	}
	for len(buf) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		i := sort.Search(len(it.runs), func(i int) bool { return it.runs[i].end > vaddr })
		if i == len(it.runs) || it.runs[i].vaddr > vaddr {
			return fmt.Errorf("%w: task %d page %#x", ErrNoPage, id, vaddr)
		}
		r := it.runs[i]
		n := min(uint64(len(buf)), r.end-vaddr)
		if _, err := r.f.ReadAt(buf[:n], r.off+int64(vaddr-r.vaddr)); err != nil {
			return fmt.Errorf("lazy: task %d pages at %#x: %w", id, vaddr, err)
		}
		buf, vaddr = buf[n:], vaddr+n
	}
	return nil
}

// task loads id's pagemap and opens its pages image, once.
func (s *ImageSource) task(id uint64) (*imageTask, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("lazy: image source closed")
	}
	if it := s.tasks[id]; it != nil {
		return it, nil
	}
	it := &imageTask{}
	if err := it.load(s.dir, id); err != nil {
		it.close()
		return nil, fmt.Errorf("lazy: task %d: %w", id, err)
	}
	s.tasks[id] = it
	return it, nil
}

// Close closes the pages images; later reads fail.
func (s *ImageSource) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	var errs []error
	for _, it := range s.tasks {
		errs = append(errs, it.close())
	}
	clear(s.tasks)
	return errors.Join(errs...)
}

// load reads id's pagemap of dir: a PE_PRESENT range is in dir's pages
// image; any other range (PE_PARENT, or lazy without content here, as
// MarkImages leaves a parent's range) is looked up in the parent level, as
// far as it holds it.
func (it *imageTask) load(dir string, id uint64) error {
	m, f, err := it.open(dir, id)
	if err != nil {
		return err
	}
	var parent *imageTask
	var off int64
	for _, e := range m.Entries {
		end := e.Vaddr + e.NrPages*pageSize // bounded by ReadPagemap
		if e.Flags&pagestore.FlagPresent != 0 {
			it.runs = append(it.runs, imageRun{e.Vaddr, end, off, f})
			off += int64(e.NrPages * pageSize)
			continue
		}
		if parent == nil {
			parent = &imageTask{}
			if err := parent.load(filepath.Join(dir, "parent"), id); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			it.files = append(it.files, parent.files...)
		}
		for _, r := range parent.runs {
			if s, t := max(r.vaddr, e.Vaddr), min(r.end, end); s < t {
				it.runs = append(it.runs, imageRun{s, t, r.off + int64(s-r.vaddr), r.f})
			}
		}
	}
	return nil
}

// open reads dir's pagemap of id and opens its pages image (nil if the
// pagemap has no content).
func (it *imageTask) open(dir string, id uint64) (*pagestore.Pagemap, *os.File, error) {
	m, err := readImage(filepath.Join(dir, fmt.Sprintf("pagemap-%d.img", id)), pagestore.ReadPagemap)
	if err != nil {
		return nil, nil, err
	}
	want := int64(m.PresentPages() * pageSize)
	if want == 0 {
		return m, nil, nil
	}
	path := filepath.Join(dir, pagestore.PagesName(m.PagesID))
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	it.files = append(it.files, f)
	if fi, err := f.Stat(); err != nil || fi.Size() < want {
		return nil, nil, fmt.Errorf("%s holds less than its pagemap's %d bytes: %v", path, want, err)
	}
	return m, f, nil
}

func (it *imageTask) close() error {
	var errs []error
	for _, f := range it.files {
		errs = append(errs, f.Close())
	}
	it.files = nil
	return errors.Join(errs...)
}

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
// pages-<pages_id>.img. It serves only pages with content in that dir
// (PE_PRESENT, lazy or not); PE_PARENT ranges are never lazy, so the parent
// chain is not followed. Safe for concurrent use; Close releases its files.
type ImageSource struct {
	dir string

	mu     sync.Mutex
	tasks  map[uint64]*imageTask // guarded by mu
	closed bool                  // guarded by mu
}

// imageTask is one task's pages: sorted runs of its pages image.
type imageTask struct {
	runs  []imageRun
	pages *os.File // nil if no run has content
}

// imageRun is [vaddr, end) of a task, at off in its pages image.
type imageRun struct {
	vaddr, end uint64
	off        int64
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
		if _, err := it.pages.ReadAt(buf[:n], r.off+int64(vaddr-r.vaddr)); err != nil {
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
	m, err := readImage(filepath.Join(s.dir, fmt.Sprintf("pagemap-%d.img", id)), pagestore.ReadPagemap)
	if err != nil {
		return nil, fmt.Errorf("lazy: task %d: %w", id, err)
	}
	it := &imageTask{}
	var off int64
	for _, e := range m.Entries {
		if e.Flags&pagestore.FlagPresent == 0 {
			continue
		}
		end := e.Vaddr + e.NrPages*pageSize // bounded by ReadPagemap
		it.runs = append(it.runs, imageRun{e.Vaddr, end, off})
		off += int64(e.NrPages * pageSize)
	}
	if len(it.runs) > 0 {
		path := filepath.Join(s.dir, pagestore.PagesName(m.PagesID))
		if it.pages, err = os.Open(path); err != nil {
			return nil, fmt.Errorf("lazy: task %d: %w", id, err)
		}
		if fi, err := it.pages.Stat(); err != nil || fi.Size() < off {
			it.pages.Close()
			return nil, fmt.Errorf("lazy: task %d: %s holds less than its pagemap's %d bytes: %v", id, path, off, err)
		}
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
		if it.pages != nil {
			errs = append(errs, it.pages.Close())
		}
	}
	clear(s.tasks)
	return errors.Join(errs...)
}

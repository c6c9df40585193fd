package pagestore

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/phaul/phaul/core/linux"
)

// spool is a file holding page data, one PageSize slot per page. Slots are
// written and read with WriteAt/ReadAt (pwrite/pread), so concurrent use of
// distinct slots needs no lock; the index says which slot holds what.
type spool struct {
	f *os.File
	// linkable: f is an O_TMPFILE that linux.LinkTmpfile can name.
	linkable bool
	mu       sync.Mutex
	size     int64   // guarded by mu: bytes of slots handed out from the end
	free     []int64 // guarded by mu: slots handed back, reused first
}

// openSpool creates a spool file in dir without a name (O_TMPFILE, or a
// file unlinked at once where the filesystem lacks it), so no page data
// outlives the process unless Commit links the file as an image.
func openSpool(dir string) (*spool, error) {
	if err := makeOwnDir(dir); err != nil {
		return nil, fmt.Errorf("spool dir: %w", err)
	}
	f, err := linux.OpenTmpfile(dir)
	if err == nil {
		return &spool{f: f, linkable: true}, nil
	}
	if !errors.Is(err, errors.ErrUnsupported) {
		return nil, fmt.Errorf("spool: %w", err)
	}
	f, err = os.CreateTemp(dir, ".spool-*")
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("unlink spool: %w", err)
	}
	return &spool{f: f}, nil
}

// grow records that the slots below size are in use (a caller placed
// pages there itself).
func (s *spool) grow(size int64) {
	s.mu.Lock()
	s.size = max(s.size, size)
	s.mu.Unlock()
}

// alloc appends n slot offsets to out: reused slots first, then fresh ones
// from the end of the file, consecutive so writes coalesce.
func (s *spool) alloc(n int, out []int64) []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	for n > 0 && len(s.free) > 0 {
		out = append(out, s.free[len(s.free)-1])
		s.free = s.free[:len(s.free)-1]
		n--
	}
	for ; n > 0; n-- {
		out = append(out, s.size)
		s.size += PageSize
	}
	return out
}

// release hands slots back for reuse.
func (s *spool) release(offs ...int64) {
	if len(offs) == 0 {
		return
	}
	s.mu.Lock()
	s.free = append(s.free, offs...)
	s.mu.Unlock()
}

// bytes returns the spool's size.
func (s *spool) bytes() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return uint64(s.size)
}

// pageCopy is one page to copy between a caller's buffer and the spool.
type pageCopy struct {
	off int64 // spool offset
	buf int   // page index in the caller's buffer
}

// scratchPages is the size of the buffers that gather pages scattered in
// the caller's buffer into one write (or scatter one read): a 4 KiB copy
// costs far less than a syscall.
const scratchPages = 64

// copyRuns calls fn for each run of copies with consecutive spool offsets
// (at most scratchPages long when they are not consecutive in the
// caller's buffer), so that each run is one syscall.
func copyRuns(cs []pageCopy, fn func(run []pageCopy, contiguous bool) error) error {
	for i := 0; i < len(cs); {
		j, contiguous := i+1, true
		for j < len(cs) && cs[j].off == cs[j-1].off+PageSize {
			if cs[j].buf != cs[j-1].buf+1 {
				if j-i >= scratchPages {
					break
				}
				contiguous = false
			}
			if !contiguous && j-i >= scratchPages {
				break
			}
			j++
		}
		if err := fn(cs[i:j], contiguous); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// scratch holds *[]byte of scratchPages pages.
var scratch = sync.Pool{New: func() any {
	b := make([]byte, scratchPages*PageSize)
	return &b
}}

func (s *spool) getScratch() *[]byte  { return scratch.Get().(*[]byte) }
func (s *spool) putScratch(b *[]byte) { scratch.Put(b) }

// writePages writes buf's pages to the spool as cs says.
func (s *spool) writePages(buf []byte, cs []pageCopy) error {
	return copyRuns(cs, func(run []pageCopy, contiguous bool) error {
		first, n := run[0].buf, len(run)
		if contiguous {
			_, err := s.f.WriteAt(buf[first*PageSize:(first+n)*PageSize], run[0].off)
			return err
		}
		sp := s.getScratch()
		defer s.putScratch(sp)
		for i, c := range run {
			copy((*sp)[i*PageSize:(i+1)*PageSize], buf[c.buf*PageSize:])
		}
		_, err := s.f.WriteAt((*sp)[:n*PageSize], run[0].off)
		return err
	})
}

// readPages reads the spool's pages into buf as cs says.
func (s *spool) readPages(buf []byte, cs []pageCopy) error {
	return copyRuns(cs, func(run []pageCopy, contiguous bool) error {
		first, n := run[0].buf, len(run)
		if contiguous {
			_, err := s.f.ReadAt(buf[first*PageSize:(first+n)*PageSize], run[0].off)
			return err
		}
		sp := s.getScratch()
		defer s.putScratch(sp)
		if _, err := s.f.ReadAt((*sp)[:n*PageSize], run[0].off); err != nil {
			return err
		}
		for i, c := range run {
			copy(buf[c.buf*PageSize:(c.buf+1)*PageSize], (*sp)[i*PageSize:])
		}
		return nil
	})
}

func (s *spool) close() error { return s.f.Close() }

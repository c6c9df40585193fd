package lazy

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"github.com/phaul/phaul/core/linux"
)

// refillChunk is how much Refill reads and writes at a time.
const refillChunk = 1 << 20

// Refill writes every lazy page the images in dir hold into a restored
// tree that has not run yet (held by CRIU) and whose lazy-pages daemon is
// gone. Its userfaultfds closed with the daemon, so the tree's lazy ranges
// are plain memory again, which would read as zeros; written before the
// tree runs, its memory is whole. pids maps each task of the images (its
// pid in the tree's namespace, as pstree.img lists it) to its pid here;
// a task without a pagemap (a zombie) has no memory. A page the images do
// not hold (post-copy's pages left at the source) is an error wrapping
// ErrNoPage: such a tree cannot be made whole here. It returns the pages
// written.
//
// Never call it on a tree whose userfaultfds are still open (a daemon
// parked them): a write to a missing page would wait for that daemon.
func Refill(ctx context.Context, dir string, pids map[uint32]int) (uint64, error) {
	ids, err := readImage(filepath.Join(dir, "pstree.img"), readTaskIDs)
	if err != nil {
		return 0, fmt.Errorf("refill: %w", err)
	}
	src := NewImageSource(dir)
	defer src.Close()
	buf := make([]byte, refillChunk)
	var pages uint64
	for _, id := range ids {
		rs, err := readTaskRanges(dir, uint64(id))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return pages, fmt.Errorf("refill task %d: %w", id, err)
		}
		if len(rs.runs) == 0 {
			continue
		}
		pid, ok := pids[id]
		if !ok {
			return pages, fmt.Errorf("refill: task %d of the images has no process here", id)
		}
		for _, r := range rs.runs {
			for a := r.start; a < r.end; {
				n := min(r.end-a, refillChunk)
				if err := src.ReadPages(ctx, uint64(id), a, buf[:n]); err != nil {
					return pages, fmt.Errorf("refill task %d: %w", id, err)
				}
				if err := linux.WriteProcessMemory(pid, a, buf[:n]); err != nil {
					return pages, fmt.Errorf("refill task %d: %w", id, err)
				}
				pages += n / pageSize
				a += n
			}
		}
	}
	return pages, nil
}

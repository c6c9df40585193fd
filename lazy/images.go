package lazy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	mmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/mm"
	pstreeimg "github.com/checkpoint-restore/go-criu/v8/crit/images/pstree"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/core/pagestore"
)

// Image magics (criu/include/magic.h), little-endian as CRIU writes them on
// amd64.
const (
	magicImgCommon uint32 = 0x54564319
	magicMM        uint32 = 0x57492820
	magicPstree    uint32 = 0x50273030
)

// maxMMBytes bounds the one record of mm-<id>.img: CRIU's entry takes
// about 60 bytes a VMA, and the kernel allows 65530 VMAs by default.
const maxMMBytes = 32 << 20

// maxPstreeBytes bounds one record of pstree.img: a task's ids and a
// varint per thread, so 1 MiB holds some 200 000 threads.
const maxPstreeBytes = 1 << 20

// VMA bits CRIU stores: flags are MAP_* (x86_64 values), status is
// VMA_AREA_* and VMA_* of criu/include/image.h.
const (
	mapPrivate   = 0x02
	mapAnonymous = 0x20
	mapLocked    = 0x2000
	mapHugetlb   = 0x40000

	vmaAreaVsyscall = 1 << 2
	vmaAreaVDSO     = 1 << 3
	vmaAreaVVAR     = 1 << 12
)

// vma is one mapping of mm-<id>.img that CRIU's restore registers with
// userfaultfd.
type vma struct{ start, end uint64 }

// readLazyVMAs decodes mm-<id>.img and returns the VMAs that can be lazy,
// as CRIU's vma_entry_can_be_lazy decides: anonymous private, neither
// locked nor hugetlb, not vDSO, vvar or vsyscall. It requires every VMA
// page-aligned, non-empty, sorted and not overlapping (vsyscall lies at
// the top of the address space); anything else is an error wrapping
// ErrImage.
func readLazyVMAs(r io.Reader) ([]vma, error) {
	mm, err := readMM(r)
	if err != nil {
		return nil, err
	}
	return lazyVMAs(mm)
}

// lazyVMAs is readLazyVMAs on a decoded mm entry.
func lazyVMAs(mm *mmimg.MmEntry) ([]vma, error) {
	var out []vma
	var end uint64
	for i, v := range mm.GetVmas() {
		s, e := v.GetStart(), v.GetEnd()
		if s%pageSize != 0 || e%pageSize != 0 || s >= e || s < end {
			return nil, fmt.Errorf("%w: vma %d [%#x, %#x) after %#x", ErrImage, i, s, e, end)
		}
		end = e
		flags, status := v.GetFlags(), v.GetStatus()
		if flags&(mapAnonymous|mapPrivate) != mapAnonymous|mapPrivate || flags&(mapLocked|mapHugetlb) != 0 ||
			status&(vmaAreaVsyscall|vmaAreaVDSO|vmaAreaVVAR) != 0 {
			continue
		}
		out = append(out, vma{s, e})
	}
	return out, nil
}

// readEagerRanges decodes mm-<id>.img and returns the pages holding the
// task's command line and environment ([arg_start, arg_end) and
// [env_start, env_end), page-rounded): another process reads them
// (ps, /proc/PID/cmdline and environ), and a remote read of a missing
// page does not wait for the daemon but comes back empty, so they are
// restored eagerly.
func readEagerRanges(r io.Reader) ([]vma, error) {
	mm, err := readMM(r)
	if err != nil {
		return nil, err
	}
	return eagerRanges(mm), nil
}

// eagerRanges is readEagerRanges on a decoded mm entry.
func eagerRanges(mm *mmimg.MmEntry) []vma {
	var out []vma
	for _, r := range [][2]uint64{{mm.GetMmArgStart(), mm.GetMmArgEnd()}, {mm.GetMmEnvStart(), mm.GetMmEnvEnd()}} {
		s, e := r[0]&^(pageSize-1), (r[1]+pageSize-1)&^(pageSize-1)
		if r[0] >= r[1] || e < s || e-s > maxEagerBytes {
			continue // empty or not believable: nothing made eager
		}
		out = append(out, vma{s, e})
	}
	return out
}

// maxEagerBytes bounds a command line or environment taken eagerly (the
// kernel's limit for both together is a quarter of the stack rlimit;
// more than this is not a command line worth a page copy each).
const maxEagerBytes = 4 << 20

// EagerRanges returns, from task id's mm image in dir, the page ranges
// [start, end) holding its command line and environment, which a lazy
// restore must take eagerly (readEagerRanges).
func EagerRanges(dir string, id uint64) ([][2]uint64, error) {
	vs, err := readImage(filepath.Join(dir, fmt.Sprintf("mm-%d.img", id)), readEagerRanges)
	if err != nil {
		return nil, err
	}
	out := make([][2]uint64, len(vs))
	for i, v := range vs {
		out[i] = [2]uint64{v.start, v.end}
	}
	return out, nil
}

// readMM decodes mm-<id>.img's one record. Partial: phaul reads only the
// VMAs and the argument and environment bounds, each checked by its user.
func readMM(r io.Reader) (*mmimg.MmEntry, error) {
	rec, err := readRecord(r, magicMM, maxMMBytes, "mm")
	if err != nil {
		return nil, err
	}
	var mm mmimg.MmEntry
	if err := (proto.UnmarshalOptions{AllowPartial: true}).Unmarshal(rec, &mm); err != nil {
		return nil, fmt.Errorf("%w: mm entry: %w", ErrImage, err)
	}
	return &mm, nil
}

// readRecord reads an image that holds one protobuf record: the common
// magic, the image's magic, a u32 length (at most max) and the record.
// Anything else is an error wrapping ErrImage, naming the image what.
func readRecord(r io.Reader, magic, max uint32, what string) ([]byte, error) {
	if err := readMagic(r, magic, what); err != nil {
		return nil, err
	}
	rec, err := readSized(r, max, what)
	if errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: %s entry: %w", ErrImage, what, io.ErrUnexpectedEOF)
	}
	return rec, err
}

// readMagic reads an image's header: the common magic and then magic.
func readMagic(r io.Reader, magic uint32, what string) error {
	var hdr [8]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return fmt.Errorf("%w: %s header: %w", ErrImage, what, err)
	}
	le := binary.LittleEndian
	if c, m := le.Uint32(hdr[0:]), le.Uint32(hdr[4:]); c != magicImgCommon || m != magic {
		return fmt.Errorf("%w: %s magic %#x %#x", ErrImage, what, c, m)
	}
	return nil
}

// readSized reads one record: a u32 length (at most max) and the record.
// It returns io.EOF, unwrapped, if r ends before the length; anything
// else that is wrong is an error wrapping ErrImage.
func readSized(r io.Reader, max uint32, what string) ([]byte, error) {
	var w [4]byte
	if _, err := io.ReadFull(r, w[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("%w: %s entry size: %w", ErrImage, what, err)
	}
	n := binary.LittleEndian.Uint32(w[:])
	if n > max {
		return nil, fmt.Errorf("%w: %s entry of %d bytes, at most %d", ErrImage, what, n, max)
	}
	rec := make([]byte, n) // bounded above
	if _, err := io.ReadFull(r, rec); err != nil {
		return nil, fmt.Errorf("%w: %s entry: %w", ErrImage, what, unexpected(err))
	}
	return rec, nil
}

// readTaskCount decodes pstree.img and returns how many tasks it lists:
// the restore sends one record per task, a zombie's too.
func readTaskCount(r io.Reader) (int, error) {
	ids, err := readTaskIDs(r)
	return len(ids), err
}

// readTaskIDs decodes pstree.img and returns the pid (in the tree's
// namespace) of each task it lists. Every entry must decode and name a
// pid in 1..maxPid, and there must be one; anything else is an error
// wrapping ErrImage.
func readTaskIDs(r io.Reader) ([]uint32, error) {
	if err := readMagic(r, magicPstree, "pstree"); err != nil {
		return nil, err
	}
	var ids []uint32
	n := 0
	for {
		rec, err := readSized(r, maxPstreeBytes, "pstree")
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		var e pstreeimg.PstreeEntry
		if err := proto.Unmarshal(rec, &e); err != nil {
			return nil, fmt.Errorf("%w: pstree entry %d: %w", ErrImage, n, err)
		}
		if pid := e.GetPid(); pid == 0 || pid > maxPid {
			return nil, fmt.Errorf("%w: pstree entry %d: pid %d", ErrImage, n, pid)
		}
		ids = append(ids, e.GetPid())
		if n++; n > maxPid {
			return nil, fmt.Errorf("%w: pstree: more than %d tasks", ErrImage, maxPid)
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: pstree: no task", ErrImage)
	}
	return ids, nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// lazyRanges returns the lazy pages of one task: the ranges of its
// pagemap's PE_LAZY entries (top level only: PE_PARENT ranges are never
// lazy) inside the VMAs that can be lazy, split at VMA boundaries, since
// UFFDIO_COPY cannot cross one.
func lazyRanges(m *pagestore.Pagemap, vmas []vma) segs {
	var p segs
	v := 0
	for _, e := range m.Entries {
		if e.Flags&pagestore.FlagLazy == 0 {
			continue
		}
		start, end := e.Vaddr, e.Vaddr+e.NrPages*pageSize
		for ; v < len(vmas) && vmas[v].end <= start; v++ {
		}
		for w := v; w < len(vmas) && vmas[w].start < end; w++ {
			s, t := max(start, vmas[w].start), min(end, vmas[w].end)
			p.add(seg{s, t, s})
		}
	}
	return p
}

// readTaskRanges reads pagemap-<id>.img and mm-<id>.img of dir.
func readTaskRanges(dir string, id uint64) (segs, error) {
	m, err := readImage(filepath.Join(dir, fmt.Sprintf("pagemap-%d.img", id)), pagestore.ReadPagemap)
	if err != nil {
		return segs{}, err
	}
	vmas, err := readImage(filepath.Join(dir, fmt.Sprintf("mm-%d.img", id)), readLazyVMAs)
	if err != nil {
		return segs{}, err
	}
	return lazyRanges(m, vmas), nil
}

func readImage[T any](path string, decode func(io.Reader) (T, error)) (T, error) {
	var zero T
	f, err := os.Open(path)
	if err != nil {
		return zero, err
	}
	defer f.Close()
	v, err := decode(f)
	if err != nil {
		return zero, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

package lazy

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	criucore "github.com/checkpoint-restore/go-criu/v8/crit/images/criu-core"
	"google.golang.org/protobuf/proto"

	"github.com/phaul/phaul/core/pagestore"
)

// magicCore is core-<tid>.img's (criu/include/magic.h).
const magicCore uint32 = 0x55053847

// maxCoreBytes bounds core-<tid>.img's one record (registers, signal
// state, rlimits: a few KiB).
const maxCoreBytes = 1 << 20

// MarkImages marks lazy (PE_LAZY), in every task pagemap of the images in
// dir, the present pages that CRIU's dump marks lazy when a restore may
// take them lazily: those in VMAs that can be lazy (anonymous private, not
// locked, hugetlb, vDSO, vvar or vsyscall), except a page that holds a
// thread's stack pointer, which CRIU's restore needs in place, and the
// pages of the command line and environment, which other processes read
// (readEagerRanges). Their data
// stays in the pages image, where ImageSource finds it; a restore without
// --lazy-pages reads them as before. A PE_PARENT range that can be lazy
// becomes lazy without content in this level (CRIU's restore copies
// PE_PARENT ranges eagerly): ImageSource reads it from the parent level,
// and only a lazy restore can use the images afterwards. It returns the
// pages it marked. Images it cannot read are an error wrapping
// ErrImage; a pagemap is replaced atomically.
func MarkImages(dir string) (uint64, error) {
	sps, err := stackPages(dir)
	if err != nil {
		return 0, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, fmt.Errorf("lazy: mark images: %w", err)
	}
	var marked uint64
	for _, e := range ents {
		k, ok := pagestore.ParsePagemapName(e.Name())
		if !ok || k.Kind != pagestore.KindTask {
			continue
		}
		n, err := markPagemap(dir, e.Name(), k.ID, sps)
		if err != nil {
			return marked, fmt.Errorf("lazy: mark %s: %w", e.Name(), err)
		}
		marked += n
	}
	return marked, nil
}

// markPagemap rewrites one task's pagemap with its lazy pages marked.
func markPagemap(dir, name string, id uint64, sps map[uint64]bool) (uint64, error) {
	m, err := readImage(filepath.Join(dir, name), pagestore.ReadPagemap)
	if err != nil {
		return 0, err
	}
	path := filepath.Join(dir, fmt.Sprintf("mm-%d.img", id))
	mm, err := readImage(path, readMM)
	if err != nil {
		return 0, err
	}
	vmas, err := lazyVMAs(mm)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	vmas = cutRanges(vmas, eagerRanges(mm))
	var out []pagestore.Entry
	var marked uint64
	for _, e := range m.Entries {
		if e.Flags != pagestore.FlagPresent && e.Flags != pagestore.FlagParent {
			out = append(out, e)
			continue
		}
		for i := uint64(0); i < e.NrPages; {
			va := e.Vaddr + i*pageSize
			lazy := canBeLazy(va, vmas, sps)
			j := i + 1
			for j < e.NrPages && canBeLazy(e.Vaddr+j*pageSize, vmas, sps) == lazy {
				j++
			}
			f := e.Flags
			switch {
			case lazy && f == pagestore.FlagParent:
				// Lazy without content here: the restore leaves it to
				// the daemon, whose ImageSource reads the parent level.
				f = pagestore.FlagLazy
				marked += j - i
			case lazy:
				f |= pagestore.FlagLazy
				marked += j - i
			}
			out = append(out, pagestore.Entry{Vaddr: va, NrPages: j - i, Flags: f})
			i = j
		}
	}
	if marked == 0 {
		return 0, nil
	}
	b, err := pagestore.EncodePagemap(&pagestore.Pagemap{PagesID: m.PagesID, Entries: out})
	if err != nil {
		return 0, err
	}
	tmp := filepath.Join(dir, "."+name+".lazy")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return 0, err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		os.Remove(tmp)
		return 0, err
	}
	return marked, nil
}

// cutRanges returns vmas without the ranges in cut.
func cutRanges(vmas, cut []vma) []vma {
	for _, c := range cut {
		var out []vma
		for _, v := range vmas {
			if c.end <= v.start || c.start >= v.end {
				out = append(out, v)
				continue
			}
			if v.start < c.start {
				out = append(out, vma{v.start, c.start})
			}
			if c.end < v.end {
				out = append(out, vma{c.end, v.end})
			}
		}
		vmas = out
	}
	return vmas
}

// canBeLazy reports whether page va lies in a VMA that can be lazy and
// holds no thread's stack pointer.
func canBeLazy(va uint64, vmas []vma, sps map[uint64]bool) bool {
	if sps[va] {
		return false
	}
	for _, v := range vmas {
		if va >= v.start && va < v.end {
			return true
		}
	}
	return false
}

// stackPages returns the pages that hold a thread's stack pointer, from
// every core-<tid>.img in dir (of any task: a page at the same address in
// another task stays eager too, which costs nothing but laziness).
func stackPages(dir string) (map[uint64]bool, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("lazy: mark images: %w", err)
	}
	sps := make(map[uint64]bool)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "core-") || !strings.HasSuffix(e.Name(), ".img") {
			continue
		}
		sp, err := readImage(filepath.Join(dir, e.Name()), readStackPointer)
		if err != nil {
			return nil, fmt.Errorf("lazy: %s: %w", e.Name(), err)
		}
		if sp != noStack {
			sps[sp&^(pageSize-1)] = true
		}
	}
	return sps, nil
}

// noStack is readStackPointer's answer for a zombie: it has no memory and
// CRIU dumps no registers for it.
const noStack = ^uint64(0)

// taskDead is a core's tc.task_state for a zombie: CRIU's dump of one
// records TASK_DEAD (compel's COMPEL_TASK_DEAD), not COMPEL_TASK_ZOMBIE.
const taskDead = 2

// readStackPointer decodes a core-<tid>.img and returns the thread's
// stack pointer (x86_64 registers), or noStack for a zombie.
func readStackPointer(r io.Reader) (uint64, error) {
	rec, err := readRecord(r, magicCore, maxCoreBytes, "core")
	if err != nil {
		return 0, err
	}
	var core criucore.CoreEntry
	if err := (proto.UnmarshalOptions{AllowPartial: true}).Unmarshal(rec, &core); err != nil {
		return 0, fmt.Errorf("%w: core entry: %w", ErrImage, err)
	}
	regs := core.GetThreadInfo().GetGpregs()
	if regs == nil && core.GetTc().GetTaskState() == taskDead {
		return noStack, nil
	}
	if regs == nil {
		return 0, fmt.Errorf("%w: core entry without x86_64 registers", ErrImage)
	}
	return regs.GetSp(), nil
}

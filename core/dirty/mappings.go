package dirty

import (
	"errors"

	"github.com/phaul/phaul/core/linux"
)

// What pre-copy sends must be exactly what CRIU's dump writes into
// pagemap-PID.img: the destination keeps every page phaul sent that the
// final dump still holds, and a page sent that CRIU does not dump would
// be restored where CRIU leaves the memory empty. Mappings picks the
// mappings, Dumpable the pages. CRIU 4.2 decides in criu/proc_parse.c
// (handle_vma, __parse_vmflags), criu/mem.c (generate_vma_iovs,
// should_dump_page) and criu/pagemap-cache.c; zoo_test.go checks each kind
// against a real dump. By kind:
//
//   - Private anonymous memory, [heap], [stack], MAP_GROWSDOWN, named
//     [anon:NAME], PROT_NONE or read-only, MADV_DONTDUMP, transparent
//     huge pages, MAP_HUGETLB: a regular private mapping to CRIU, whose
//     present or swapped pages it dumps (PROT_NONE ones too: its parasite
//     makes them readable; MADV_DONTDUMP is for core dumps only). Phaul
//     sends the same pages (linux.ReadProcessMemory reads PROT_NONE ones
//     through /proc/PID/mem).
//   - A private mapping of a file or of a memfd: CRIU dumps the pages
//     copied on write; pages still in the page cache (pagemap bit 61) are
//     the file's, mapped again on restore. Dumpable drops those too.
//   - MAP_DROPPABLE (Linux 6.11): CRIU reads "dp" from smaps' VmFlags and
//     dumps none of its pages (generate_vma_iovs): the kernel may drop
//     them anyway, and the restored mapping starts empty. Mappings leaves
//     it out, so phaul neither tracks nor sends it; only smaps shows the
//     flag, so Mappings reads smaps where the kernel has MAP_DROPPABLE.
//   - Guard regions (MADV_GUARD_INSTALL, 6.13): markers in the page
//     table, reported by pagemap as swapped with bit 58 (6.15). CRIU skips
//     them (PME_GUARD_REGION, PAGE_IS_GUARD) and installs them again on
//     restore; Dumpable skips them. On 6.13 and 6.14 pagemap cannot tell
//     them apart, and CRIU refuses to dump a process that has them.
//   - Shared mappings (shared anonymous, memfd or file MAP_SHARED, SysV
//     shm): CRIU dumps shared memory once, into its shmem images
//     (pagemap-shmem-ID.img), or leaves it in its file; never in
//     pagemap-PID. Mappings leaves them out.
//   - An AIO ring (/[aio], shared): CRIU dumps all of it into
//     pagemap-PID, but the kernel writes it and no tracker sees those
//     writes, so CRIU's pre-dump skips it and phaul leaves it, shared, to
//     the final dump.
//   - [vdso]: CRIU dumps all of it (it may build a proxy on restore);
//     phaul leaves it to the final dump, which writes what CRIU dumps.
//     [vvar] and [vvar_vclock] are never dumped (restore maps the
//     kernel's), nor are [vsyscall], [vectors] and [uprobes]: all
//     linux.Mapping.Special, left out.
//   - VM_IO or VM_PFNMAP mappings (smaps "io", "pf"), but [vvar] and
//     shared files: CRIU refuses to dump the process; nothing to match.

// Mappings returns the ranges of pid whose memory CRIU dumps into the
// process's pagemap and phaul tracks and pre-copies: private mappings,
// not droppable, not the kernel's own. See the list above.
func Mappings(pid int) ([]Range, error) {
	ms, err := readMappings(pid)
	if err != nil {
		return nil, err
	}
	var rs []Range
	for _, m := range ms {
		if m.Private() && !m.Special() && !m.Droppable() {
			rs = append(rs, Range{m.Start, m.End})
		}
	}
	return rs, nil
}

// readMappings reads smaps, which alone shows MAP_DROPPABLE, or the
// cheaper maps where the kernel has no MAP_DROPPABLE.
func readMappings(pid int) ([]linux.Mapping, error) {
	if errors.Is(linux.HaveDroppable(), linux.ErrNotSupported) {
		return linux.ReadMaps(pid)
	}
	return linux.ReadSmaps(pid)
}

// Dumpable reports whether CRIU dumps the page of a mapping Mappings
// returns whose pagemap entry is e: present or swapped, anonymous (not
// page cache), not the shared zero page (frame zeroPFN; 0: unknown), not
// a guard region. (The huge zero page reads as page cache.) Nor a uffd-wp
// tracker's marker on a page with no data (linux.PagemapEntry.UffdWPMarker):
// pagemap reports it as swapped, and a CRIU dump run while the tracker is
// armed dumps it, but a dump of the untracked process would not.
func Dumpable(e linux.PagemapEntry, zeroPFN uint64) bool {
	if e.FileOrShared() || e.Guard() || e.UffdWPMarker() {
		return false
	}
	if e.Swapped() {
		return true
	}
	return e.Present() && (zeroPFN == 0 || e.PFN() != zeroPFN)
}

package dirty

import (
	"fmt"

	"github.com/zeebo/xxh3"

	"github.com/phaul/phaul/core/linux"
)

// hashTracker compares a 64-bit hash of every present page with the one it
// had at the previous Collect, or with the one of what was sent of it since
// (Sent). It needs nothing from the kernel beyond
// /proc/PID/pagemap and process_vm_readv, and reads every present page of
// the process each Collect.
type hashTracker struct {
	pid  int
	pm   *linux.Pagemap
	sums map[uint64]uint64 // page address -> xxh3 of its content
	ents []linux.PagemapEntry
	buf  []byte
}

func startHash(pid int) (*hashTracker, error) {
	pm, err := linux.OpenPagemap(pid)
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindHash, pid, err)
	}
	t := &hashTracker{pid: pid, pm: pm, sums: make(map[uint64]uint64),
		ents: make([]linux.PagemapEntry, entriesChunk), buf: make([]byte, pageSize)}
	if _, err := t.Collect(); err != nil {
		pm.Close()
		return nil, err
	}
	return t, nil
}

func (t *hashTracker) Kind() string { return KindHash }

// Collect hashes every present or swapped page of the tracked mappings and
// reports those whose hash changed, the new ones, and those that are gone
// (unmapped or dropped: their content changed too).
func (t *hashTracker) Collect() ([]Range, error) {
	if t.pm == nil {
		return nil, fmt.Errorf("%s %d: stopped", KindHash, t.pid)
	}
	rs, err := Mappings(t.pid)
	if err != nil {
		return nil, err
	}
	var out []Range
	seen := make(map[uint64]uint64, len(t.sums))
	err = walkEntries(t.pm, rs, t.ents, func(at uint64, ents []linux.PagemapEntry) {
		for i, e := range ents {
			if !e.Present() && !e.Swapped() {
				continue
			}
			addr := at + uint64(i)*pageSize
			page := t.buf[:pageSize]
			got, err := linux.ReadProcessMemory(t.pid, addr, page)
			if err != nil || got != pageSize {
				continue // unmapped meanwhile: reported below if it was known
			}
			sum := xxh3.Hash(page)
			seen[addr] = sum
			if old, ok := t.sums[addr]; !ok || old != sum {
				out = addPage(out, addr)
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindHash, t.pid, err)
	}
	for addr := range t.sums {
		if _, ok := seen[addr]; !ok {
			out = append(out, Range{addr, addr + pageSize})
		}
	}
	t.sums = seen
	return merge(out), nil
}

// Sent makes the pages of data the ones the next Collect compares with.
func (t *hashTracker) Sent(vaddr uint64, data []byte) {
	for off := 0; off+pageSize <= len(data); off += pageSize {
		t.sums[vaddr+uint64(off)] = xxh3.Hash(data[off : off+pageSize])
	}
}

func (t *hashTracker) Stop() error {
	if t.pm == nil {
		return nil
	}
	err := t.pm.Close()
	t.pm = nil
	return err
}

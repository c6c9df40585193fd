package dirty

import (
	"fmt"

	"github.com/zeebo/xxh3"

	"github.com/phaul/phaul/core/linux"
)

// hashTracker compares a 64-bit hash of every present page with the one it
// had at the previous Collect. It needs nothing from the kernel beyond
// /proc/PID/pagemap and process_vm_readv, and reads every present page of
// the process each Collect.
type hashTracker struct {
	pid  int
	pm   *linux.Pagemap
	sums map[uint64]uint64 // page address -> xxh3 of its content
	ents []linux.PagemapEntry
	buf  []byte
}

// hashChunk pages are looked up and read at once.
const hashChunk = 256

func startHash(pid int) (*hashTracker, error) {
	pm, err := linux.OpenPagemap(pid)
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindHash, pid, err)
	}
	t := &hashTracker{pid: pid, pm: pm, sums: make(map[uint64]uint64),
		ents: make([]linux.PagemapEntry, hashChunk), buf: make([]byte, hashChunk*pageSize)}
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
	rs, err := tracked(t.pid)
	if err != nil {
		return nil, err
	}
	var out []Range
	seen := make(map[uint64]uint64, len(t.sums))
	mark := func(addr uint64) {
		if n := len(out); n > 0 && out[n-1].End == addr {
			out[n-1].End += pageSize
			return
		}
		out = append(out, Range{addr, addr + pageSize})
	}
	for _, r := range rs {
		for at := r.Start; at < r.End; at += hashChunk * pageSize {
			n := min(hashChunk, int((r.End-at)/pageSize))
			if err := t.pm.Entries(at, t.ents[:n]); err != nil {
				return nil, fmt.Errorf("%s %d: %w", KindHash, t.pid, err)
			}
			for i, e := range t.ents[:n] {
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
					mark(addr)
				}
			}
		}
	}
	for addr := range t.sums {
		if _, ok := seen[addr]; !ok {
			out = append(out, Range{addr, addr + pageSize})
		}
	}
	t.sums = seen
	return merge(out), nil
}

func (t *hashTracker) Stop() error {
	if t.pm == nil {
		return nil
	}
	err := t.pm.Close()
	t.pm = nil
	return err
}

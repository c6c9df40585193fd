package dirty

import (
	"fmt"
	"os"
	"strconv"

	"github.com/phaul/phaul/core/linux"
)

// softDirty is the soft-dirty tracker: writing "4" to clear_refs clears
// the soft-dirty bit of every pte of the process, and a write sets it again
// (bit 55 of the page's pagemap entry). Reading the bits and clearing them
// are two steps, and a write between them would be lost, so Collect stops
// every thread of the process around them (ptrace, as CRIU's pre-dump
// freezes the tree).
type softDirty struct {
	pid  int
	pm   *linux.Pagemap
	ents []linux.PagemapEntry
}

func startSoftDirty(pid int) (*softDirty, error) {
	pm, err := linux.OpenPagemap(pid)
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindSoftDirty, pid, err)
	}
	t := &softDirty{pid: pid, pm: pm, ents: make([]linux.PagemapEntry, entriesChunk)}
	if err := t.clear(); err != nil {
		pm.Close()
		return nil, err
	}
	return t, nil
}

func (t *softDirty) Kind() string { return KindSoftDirty }

func (t *softDirty) clear() error {
	if err := os.WriteFile("/proc/"+strconv.Itoa(t.pid)+"/clear_refs", []byte("4"), 0); err != nil {
		return fmt.Errorf("%s %d: clear_refs: %w", KindSoftDirty, t.pid, err)
	}
	return nil
}

// Collect stops the process's threads, reads the soft-dirty pages of the
// tracked mappings, clears the bits and lets the threads go on.
func (t *softDirty) Collect() ([]Range, error) {
	if t.pm == nil {
		return nil, fmt.Errorf("%s %d: stopped", KindSoftDirty, t.pid)
	}
	thaw, err := linux.StopThreads(t.pid)
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindSoftDirty, t.pid, err)
	}
	defer thaw()
	rs, err := Mappings(t.pid)
	if err != nil {
		return nil, err
	}
	var out []Range
	err = walkEntries(t.pm, rs, t.ents, func(at uint64, ents []linux.PagemapEntry) {
		out = appendSoftDirty(out, at, ents)
	})
	if err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindSoftDirty, t.pid, err)
	}
	if err := t.clear(); err != nil {
		return nil, err
	}
	return merge(out), nil
}

// appendSoftDirty appends the pages from addr whose entries have the
// soft-dirty bit to out, joining neighbours.
func appendSoftDirty(out []Range, addr uint64, ents []linux.PagemapEntry) []Range {
	for i, e := range ents {
		if e.SoftDirty() {
			out = addPage(out, addr+uint64(i)*pageSize)
		}
	}
	return out
}

func (t *softDirty) Stop() error {
	if t.pm == nil {
		return nil
	}
	err := t.pm.Close()
	t.pm = nil
	return err
}

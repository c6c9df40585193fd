package pageserver

import (
	"fmt"
	"sync"
	"testing"

	"github.com/phaul/phaul/core/pagestore"
)

// memStore is an in-memory Store that checks what the server hands it: the
// invariants spec.md promises (bounded, aligned, valid flags, data iff
// present). Violations are reported through t.Errorf.
type memStore struct {
	t         testing.TB
	mu        sync.Mutex
	parents   map[pagestore.Key]bool              // Open's answer
	pages     map[pagestore.Key]map[uint64][]byte // present pages by vaddr
	ranges    int                                 // Add calls
	opened    map[pagestore.Key]int
	commits   int
	commitErr error // returned by Commit if set
	final     bool  // BeginFinal was called (memReceive)
}

func newMemStore(t testing.TB) *memStore {
	return &memStore{t: t, parents: map[pagestore.Key]bool{}, pages: map[pagestore.Key]map[uint64][]byte{}, opened: map[pagestore.Key]int{}}
}

func (m *memStore) checkKey(k pagestore.Key) {
	switch {
	case k.Kind == pagestore.KindTask && k.ID >= 1 && k.ID <= MaxPID:
	case k.Kind == pagestore.KindShmem && k.ID < 1<<56:
	default:
		m.t.Errorf("store got key %+v", k)
	}
}

func (m *memStore) Open(k pagestore.Key) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkKey(k)
	m.opened[k]++
	return m.parents[k], nil
}

func (m *memStore) Add(k pagestore.Key, vaddr, nrPages uint64, flags uint32, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkKey(k)
	if m.opened[k] == 0 {
		m.t.Errorf("Add to %+v before Open", k)
	}
	if vaddr%PageSize != 0 || nrPages == 0 || vaddr >= MaxAddress || nrPages > (MaxAddress-vaddr)/PageSize {
		m.t.Errorf("store got range %#x+%d", vaddr, nrPages)
	}
	if !validFlags(Flags(flags)) || flags > 0xffff {
		m.t.Errorf("store got flags %#x", flags)
	}
	if flags&uint32(FlagParent) != 0 && !m.parents[k] {
		m.t.Errorf("store got a parent range for %+v without parent", k)
	}
	m.ranges++
	if flags&uint32(FlagPresent) == 0 {
		if data != nil {
			m.t.Errorf("store got %d bytes with flags %#x", len(data), flags)
		}
		return nil
	}
	if nrPages > MaxPagesPerIOV || uint64(len(data)) != nrPages*PageSize {
		m.t.Errorf("store got %d bytes for %d pages", len(data), nrPages)
		return nil
	}
	if m.pages[k] == nil {
		m.pages[k] = map[uint64][]byte{}
	}
	for i := range nrPages {
		m.pages[k][vaddr+i*PageSize] = append([]byte(nil), data[i*PageSize:(i+1)*PageSize]...)
	}
	return nil
}

func (m *memStore) Read(k pagestore.Key, vaddr uint64, buf []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(buf) == 0 || len(buf)%PageSize != 0 {
		m.t.Errorf("Read into %d bytes", len(buf))
	}
	for i := 0; i < len(buf); i += PageSize {
		p, ok := m.pages[k][vaddr+uint64(i)]
		if !ok {
			return fmt.Errorf("mem read %#x: %w", vaddr+uint64(i), pagestore.ErrNotFound)
		}
		copy(buf[i:], p)
	}
	return nil
}

func (m *memStore) Commit() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.commits++
	return m.commitErr
}

func (m *memStore) page(k pagestore.Key, vaddr uint64) ([]byte, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.pages[k][vaddr]
	return p, ok
}

func (m *memStore) counts() (ranges, commits int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ranges, m.commits
}

package pagestore

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
)

type state int

const (
	stateOpen state = iota
	stateCommitting
	stateCommitted
	stateClosed
)

// Store holds the pages of one images directory until Commit writes them
// out. Create it with New; Close it to drop the spool.
type Store struct {
	cfg          Config
	log          *slog.Logger
	spool        *spool // shared by the keys beyond maxOwnSpools
	ownsSpoolDir bool   // New created cfg.SpoolDir: Close removes it if empty

	// mu orders state changes against page operations: Add, Open and Read
	// hold it shared for their whole run, so taking it exclusively waits
	// for them to finish.
	mu    sync.RWMutex
	state state // guarded by mu
	// final: BeginFinal was called (guarded by mu, set with it held
	// exclusively): pages recorded from then on, and pages Kept, are the
	// only ones Commit writes.
	final bool

	keysMu sync.RWMutex
	keys   map[Key]*pagemap // guarded by keysMu
	spools []*spool         // guarded by keysMu: the keys' own spools

	dataPages atomic.Uint64 // pages with data held, all keys; reserved before use
	pages     atomic.Uint64 // pages recorded, all keys; reserved before use
	chunks    atomic.Uint64 // index chunks, all keys; reserved before use
	walked    atomic.Uint64 // pages walked by adds and keeps (walk)
	broken    atomic.Bool   // a spool write failed
}

// Counts describes the pages of one key, or of all keys.
type Counts struct {
	Pages       uint64 // pages recorded, of every kind
	DataPages   uint64 // present pages whose bytes are held
	ZeroPages   uint64 // present pages that are all zeros: no bytes held
	LazyPages   uint64 // lazy pages without content here (FlagLazy alone)
	ParentPages uint64 // pages in a parent level (FlagParent)
	Replaced    uint64 // times a newer copy replaced a recorded page
	Bytes       uint64 // page bytes held: DataPages * PageSize
}

// Stats is a snapshot of a Store's content.
type Stats struct {
	Counts                    // all keys
	Keys       map[Key]Counts // per key
	SpoolBytes uint64         // spool files' size: Bytes, slots free for reuse, holes of zero pages
}

// New creates a Store for cfg.Dir and its spool file in cfg.SpoolDir
// (created if missing). Nothing is written to cfg.Dir before Commit.
func New(cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	_, statErr := os.Stat(cfg.SpoolDir)
	sp, err := openSpool(cfg.SpoolDir)
	if err != nil {
		return nil, fmt.Errorf("pagestore %s: %w", cfg.Dir, err)
	}
	s := &Store{
		cfg:          cfg,
		log:          cfg.Logger.With("images", cfg.Dir),
		spool:        sp,
		ownsSpoolDir: errors.Is(statErr, fs.ErrNotExist),
		keys:         make(map[Key]*pagemap),
	}
	s.log.Debug("page store open", "spool", cfg.SpoolDir, "max_bytes", cfg.MaxBytes, "max_pages", cfg.MaxPages)
	return s, nil
}

// usable reports why page data may not be used. Callers hold mu.
func (s *Store) usable() error {
	if s.state == stateClosed {
		return ErrClosed
	}
	if s.broken.Load() {
		return ErrBroken
	}
	return nil
}

// writable reports why pages may not be added. Callers hold mu.
func (s *Store) writable() error {
	if err := s.usable(); err != nil {
		return err
	}
	if s.state != stateOpen {
		return ErrCommitted
	}
	return nil
}

// pagemap returns k's index, or nil.
func (s *Store) pagemap(k Key) *pagemap {
	s.keysMu.RLock()
	defer s.keysMu.RUnlock()
	return s.keys[k]
}

// open returns k's index, creating it unless MaxKeys exist.
func (s *Store) open(k Key) (*pagemap, error) {
	if p := s.pagemap(k); p != nil {
		return p, nil
	}
	s.keysMu.Lock()
	defer s.keysMu.Unlock()
	p := s.keys[k]
	if p == nil {
		if len(s.keys) >= MaxKeys {
			return nil, fmt.Errorf("%w: more than %d pagemaps", ErrLimit, MaxKeys)
		}
		var sp *spool
		if len(s.spools) < maxOwnSpools {
			var err error
			if sp, err = openSpool(s.cfg.SpoolDir); err != nil {
				return nil, err
			}
			s.spools = append(s.spools, sp)
		}
		p = newPagemap(k, cmp.Or(sp, s.spool), sp != nil)
		s.keys[k] = p
	}
	return p, nil
}

// Open starts (or continues) the pagemap of k, as CRIU's OPEN2 does: Commit
// writes a pagemap for every opened key, even one without pages. It reports
// whether a parent image level holds that pagemap, as CRIU's page server
// does: Dir/parent/<pagemap name> exists (Dir/parent is CRIU's link to the
// previous level).
func (s *Store) Open(k Key) (hasParent bool, err error) {
	if err := k.validate(); err != nil {
		return false, fmt.Errorf("open %v: %w", k, err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.writable(); err != nil {
		return false, fmt.Errorf("open %v: %w", k, err)
	}
	if _, err := s.open(k); err != nil {
		return false, fmt.Errorf("open %v: %w", k, err)
	}
	fi, err := os.Stat(filepath.Join(s.cfg.Dir, "parent", k.pagemapName()))
	switch {
	case err == nil:
		return fi.Mode().IsRegular(), nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("open %v: parent: %w", k, err)
}

// cursor looks slots up, caching the last chunk. Callers hold p.mu.
type cursor struct {
	p     *pagemap
	idx   uint64
	c     *chunk
	valid bool
}

func (cu *cursor) get(pn uint64) slot {
	if idx := pn >> chunkShift; !cu.valid || idx != cu.idx {
		cu.c, cu.idx, cu.valid = cu.p.chunks[idx], idx, true
	}
	if cu.c == nil {
		return 0
	}
	return cu.c[pn&(chunkPages-1)]
}

// Read copies the newest content of the pages at vaddr..vaddr+len(buf) into
// buf; len(buf) is a positive multiple of PageSize. Zero pages read as
// zeros. A page never added is ErrNotFound, a lazy or parent page without
// content ErrNoContent; then buf holds a partial copy. Read works until
// Close, after Commit too.
func (s *Store) Read(k Key, vaddr uint64, buf []byte) error {
	if len(buf) == 0 || len(buf)%PageSize != 0 {
		return fmt.Errorf("read %v %#x: %w: buffer of %d bytes", k, vaddr, ErrInvalid, len(buf))
	}
	if err := k.validate(); err != nil {
		return fmt.Errorf("read %v %#x: %w", k, vaddr, err)
	}
	nrPages := uint64(len(buf) / PageSize)
	if err := checkRange(vaddr, nrPages); err != nil {
		return fmt.Errorf("read %v %#x: %w", k, vaddr, err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.usable(); err != nil {
		return fmt.Errorf("read %v %#x: %w", k, vaddr, err)
	}
	p := s.pagemap(k)
	if p == nil {
		return fmt.Errorf("read %v %#x: %w", k, vaddr, ErrNotFound)
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	var small [8]pageCopy
	cs := small[:0]
	cur := cursor{p: p}
	first := vaddr >> pageShift
	for i := range nrPages {
		switch sl := cur.get(first + i); {
		case sl.hasData():
			cs = append(cs, pageCopy{off: sl.offset(), buf: int(i)})
		case sl.isZero():
			clear(buf[i*PageSize : (i+1)*PageSize])
		case !sl.valid():
			return fmt.Errorf("read %v %#x: %w", k, (first+i)<<pageShift, ErrNotFound)
		default:
			return fmt.Errorf("read %v %#x: flags %#x: %w", k, (first+i)<<pageShift, sl.flags(), ErrNoContent)
		}
	}
	if err := p.sp.readPages(buf, cs); err != nil {
		return fmt.Errorf("read %v %#x: spool: %w", k, vaddr, err)
	}
	return nil
}

// Keys returns the opened keys, tasks first, each kind by id.
func (s *Store) Keys() []Key {
	s.keysMu.RLock()
	keys := make([]Key, 0, len(s.keys))
	for k := range s.keys {
		keys = append(keys, k)
	}
	s.keysMu.RUnlock()
	slices.SortFunc(keys, compareKeys)
	return keys
}

func compareKeys(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.ID, b.ID))
}

// Stats returns the page counts per key and in all.
func (s *Store) Stats() Stats {
	st := Stats{Keys: make(map[Key]Counts), SpoolBytes: s.spool.bytes()}
	s.keysMu.RLock()
	defer s.keysMu.RUnlock()
	for _, sp := range s.spools {
		st.SpoolBytes += sp.bytes()
	}
	for k, p := range s.keys {
		p.mu.RLock()
		c := p.counts
		p.mu.RUnlock()
		st.Keys[k] = c
		st.Counts.add(c)
	}
	return st
}

// Close drops the spool and the index; pages can no longer be read. It
// waits for a running Commit and is idempotent. The committed images stay.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == stateClosed {
		return nil
	}
	s.state = stateClosed
	err := s.spool.close()
	s.keysMu.Lock()
	for _, sp := range s.spools {
		err = errors.Join(err, sp.close())
	}
	s.keys, s.spools = nil, nil
	s.keysMu.Unlock()
	if s.ownsSpoolDir {
		// Removed only if empty: the spool is unlinked already, and a
		// successful Commit removed its staged files.
		if rerr := os.Remove(s.cfg.SpoolDir); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			s.log.Debug("spool dir kept", "dir", s.cfg.SpoolDir, "err", rerr)
		}
	}
	if err != nil {
		return fmt.Errorf("pagestore %s: close spool: %w", s.cfg.Dir, err)
	}
	return nil
}

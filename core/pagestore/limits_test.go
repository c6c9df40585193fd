package pagestore

import (
	"errors"
	"testing"
)

func TestBadInput(t *testing.T) {
	s := newTestStore(t, Config{})
	tests := []struct {
		name string
		op   op
	}{
		{"unaligned vaddr", op{k: task, vaddr: base + 1, n: 1, flags: FlagPresent, data: pattern(1, 1)}},
		{"zero pages", op{k: task, vaddr: base, n: 0, flags: FlagLazy}},
		{"vaddr at the limit", op{k: task, vaddr: MaxAddr, n: 1, flags: FlagLazy}},
		{"end above the limit", op{k: task, vaddr: MaxAddr - PageSize, n: 2, flags: FlagLazy}},
		{"page count overflows", op{k: task, vaddr: base, n: 1 << 52, flags: FlagLazy}},
		{"page count wraps", op{k: task, vaddr: PageSize, n: ^uint64(0), flags: FlagLazy}},
		{"zero count overflows", op{k: task, vaddr: base, n: 1<<63 + 1, zero: true}},
		{"no flags", op{k: task, vaddr: base, n: 1, flags: 0}},
		{"unknown flag", op{k: task, vaddr: base, n: 1, flags: 8}},
		{"parent and present", op{k: task, vaddr: base, n: 1, flags: FlagParent | FlagPresent, data: pattern(1, 1)}},
		{"parent and lazy", op{k: task, vaddr: base, n: 1, flags: FlagParent | FlagLazy}},
		{"short data", op{k: task, vaddr: base, n: 2, flags: FlagPresent, data: pattern(1, 1)}},
		{"long data", op{k: task, vaddr: base, n: 1, flags: FlagPresent, data: pattern(2, 1)}},
		{"missing data", op{k: task, vaddr: base, n: 1, flags: FlagPresent}},
		{"data with lazy", op{k: task, vaddr: base, n: 1, flags: FlagLazy, data: pattern(1, 1)}},
		{"data with parent", op{k: task, vaddr: base, n: 1, flags: FlagParent, data: pattern(1, 1)}},
		{"pid 0", op{k: Key{KindTask, 0}, vaddr: base, n: 1, flags: FlagLazy}},
		{"pid too large", op{k: Key{KindTask, 1 << 31}, vaddr: base, n: 1, flags: FlagLazy}},
		{"shmid too large", op{k: Key{KindShmem, 1 << 56}, vaddr: 0, n: 1, flags: FlagLazy}},
		{"unknown kind", op{k: Key{3, 1}, vaddr: base, n: 1, flags: FlagLazy}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.op.apply(s); !errors.Is(err, ErrInvalid) {
				t.Fatalf("%+v: %v, want ErrInvalid", tt.op, err)
			}
		})
	}
	reads := []struct {
		name  string
		k     Key
		vaddr uint64
		n     int
	}{
		{"empty buffer", task, base, 0},
		{"partial page", task, base, PageSize + 1},
		{"unaligned", task, base + 8, PageSize},
		{"above the limit", task, MaxAddr, PageSize},
		{"bad key", Key{9, 1}, base, PageSize},
	}
	for _, tt := range reads {
		t.Run("read "+tt.name, func(t *testing.T) {
			err := s.Read(tt.k, tt.vaddr, make([]byte, tt.n))
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("read: %v, want ErrInvalid", err)
			}
		})
	}
	if _, err := s.Open(Key{KindTask, 0}); !errors.Is(err, ErrInvalid) {
		t.Errorf("open pid 0: %v", err)
	}
	if st := s.Stats(); st.Pages != 0 || len(st.Keys) != 0 {
		t.Errorf("bad input left %+v", st)
	}
}

func TestLimits(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		ops     []op
		wantErr []bool // per op: ErrLimit expected
	}{
		{
			name: "bytes",
			cfg:  Config{MaxBytes: 4 * PageSize},
			ops: []op{
				{k: task, vaddr: base, n: 3, flags: FlagPresent, data: pattern(3, 1)},
				{k: task2, vaddr: base, n: 2, flags: FlagPresent, data: pattern(2, 1)},                     // 5 > 4
				{k: task, vaddr: base, n: 3, flags: FlagPresent, data: pattern(3, 2)},                      // overwrite: no growth
				{k: task, vaddr: base + 3*PageSize, n: 1, flags: FlagPresent, data: pattern(1, 3)},         // 4
				{k: task, vaddr: base + 4*PageSize, n: 1, flags: FlagPresent, data: pattern(1, 4)},         // 5 > 4
				{k: task, vaddr: base + 4*PageSize, n: 100, zero: true},                                    // zero pages hold no bytes
				{k: task, vaddr: base, n: 1, zero: true},                                                   // frees one
				{k: task, vaddr: base + 4*PageSize, n: 1, flags: FlagPresent, data: pattern(1, 4)},         // 4 again
				{k: task2, vaddr: base, n: 1, flags: FlagPresent | FlagLazy, data: make([]byte, PageSize)}, // zero: fits
			},
			wantErr: []bool{false, true, false, false, true, false, false, false, false},
		},
		{
			name: "pages",
			cfg:  Config{MaxPages: 8},
			ops: []op{
				{k: task, vaddr: base, n: 9, zero: true},
				{k: task, vaddr: base, n: 6, flags: FlagLazy},
				{k: task, vaddr: base, n: 6, flags: FlagPresent, data: pattern(6, 1)}, // replaces: no growth
				{k: shm, vaddr: 0, n: 3, flags: FlagParent},
				{k: shm, vaddr: 0, n: 2, flags: FlagParent},
				{k: task, vaddr: 1 << 40, n: 1 << 44, zero: true}, // refused before any work
			},
			wantErr: []bool{true, false, false, true, false, true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestStore(t, tt.cfg)
			m := model{}
			for i, o := range tt.ops {
				before := s.Stats()
				err := o.apply(s)
				if got := errors.Is(err, ErrLimit); got != tt.wantErr[i] {
					t.Fatalf("op %d: %v, want ErrLimit: %v", i, err, tt.wantErr[i])
				}
				if err != nil {
					if after := s.Stats(); after.Counts != before.Counts || after.SpoolBytes != before.SpoolBytes {
						t.Fatalf("op %d failed but changed %+v to %+v", i, before, after)
					}
					continue
				}
				m.apply(o)
			}
			m.check(t, s, true)
		})
	}
}

func TestDefaultLimitRefusesHugeRanges(t *testing.T) {
	s := newTestStore(t, Config{})
	if err := s.AddZero(task, 0, 1<<40); !errors.Is(err, ErrLimit) {
		t.Fatalf("add 2^40 zero pages: %v, want ErrLimit", err)
	}
	if err := s.Add(task, 0, 1<<40, FlagLazy, nil); !errors.Is(err, ErrLimit) {
		t.Fatalf("add 2^40 lazy pages: %v, want ErrLimit", err)
	}
}

func TestMaxKeys(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: creates MaxKeys pagemaps")
	}
	s := newTestStore(t, Config{})
	for id := range uint64(MaxKeys) {
		if _, err := s.Open(Key{KindShmem, id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Open(task); !errors.Is(err, ErrLimit) {
		t.Fatalf("open beyond MaxKeys: %v", err)
	}
	if err := s.AddZero(task, 0, 1); !errors.Is(err, ErrLimit) {
		t.Fatalf("add beyond MaxKeys: %v", err)
	}
}

// TestSpoolSlotsReused: slots freed by pages turning zero or contentless
// are reused by the key's later pages, so a spool holds no more than its
// key's data at its peak, however often pages change.
func TestSpoolSlotsReused(t *testing.T) {
	s := newTestStore(t, Config{})
	if err := s.Add(task, base, 64, FlagPresent, pattern(64, 1)); err != nil {
		t.Fatal(err)
	}
	var size uint64
	for round := range 6 {
		if round == 1 {
			size = s.Stats().SpoolBytes
		}
		if err := s.AddZero(task, base, 32); err != nil {
			t.Fatal(err)
		}
		if err := s.Add(task2, base, 32, FlagPresent, pattern(32, byte(round))); err != nil {
			t.Fatal(err)
		}
		if err := s.Add(task2, base, 32, FlagLazy, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.Add(task, base, 32, FlagPresent, pattern(32, byte(round))); err != nil {
			t.Fatal(err)
		}
	}
	if want := uint64(64+32) * PageSize; size != want {
		t.Fatalf("spools hold %d bytes after one round, want %d", size, want)
	}
	if got := s.Stats().SpoolBytes; got != size {
		t.Fatalf("spool grew from %d to %d bytes while the data held stayed", size, got)
	}
}

// TestIndexBytesBounded: one lazy page every 2 MiB costs a chunk of index
// each (issue 12: 6.4 MB of such headers took a page server from 11 MB to
// 843 MB); the index stops at MaxIndexBytes with ErrLimit, and pages in
// chunks already made still go in. Under the default bound the same
// pattern would take 256 GiB at MaxPages.
func TestIndexBytesBounded(t *testing.T) {
	const chunks = 64
	s := newTestStore(t, Config{MaxIndexBytes: chunks * chunkBytes})
	const stride = chunkPages * PageSize
	for i := range uint64(chunks) {
		if err := s.Add(task, i*stride, 1, FlagLazy, nil); err != nil {
			t.Fatalf("sparse page %d: %v", i, err)
		}
	}
	if err := s.Add(task, chunks*stride, 1, FlagLazy, nil); !errors.Is(err, ErrLimit) {
		t.Fatalf("a page needing chunk %d of %d: %v, want ErrLimit", chunks+1, chunks, err)
	}
	if err := s.Add(task, PageSize, chunkPages-1, FlagLazy, nil); err != nil {
		t.Fatalf("pages inside a chunk already made: %v", err)
	}
	if got := s.chunks.Load(); got != chunks {
		t.Fatalf("%d chunks accounted, want %d", got, chunks)
	}
	if DefaultMaxIndexBytes/chunkBytes*chunkPages < DefaultMaxPages {
		t.Fatalf("the default index bound does not hold DefaultMaxPages recorded densely")
	}
}

// TestWalkBounded: frames over a range already recorded record nothing
// new but cost CPU; their pages walked are bounded (issue 12: a zero frame
// over 2^26 recorded pages cost ~1.3 s, counted against no limit).
func TestWalkBounded(t *testing.T) {
	const maxPages = 1024
	s := newTestStore(t, Config{MaxPages: maxPages})
	for i := range walkPasses {
		if err := s.AddZero(task, 0, maxPages); err != nil {
			t.Fatalf("pass %d over the recorded range: %v", i, err)
		}
	}
	if err := s.AddZero(task, 0, 1); !errors.Is(err, ErrLimit) {
		t.Fatalf("one more page walked after %d passes: %v, want ErrLimit", walkPasses, err)
	}
}

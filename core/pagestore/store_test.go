package pagestore

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"
)

var (
	task  = Key{Kind: KindTask, ID: 1}
	task2 = Key{Kind: KindTask, ID: 42}
	shm   = Key{Kind: KindShmem, ID: 77}
)

const base = 0x7f0000000000

// op is one Add (or AddZero when zero is set).
type op struct {
	k       Key
	vaddr   uint64
	n       uint64
	flags   uint32
	data    []byte
	zero    bool
	wantErr error
}

func (o op) apply(s *Store) error {
	if o.zero {
		return s.AddZero(o.k, o.vaddr, o.n)
	}
	return s.Add(o.k, o.vaddr, o.n, o.flags, o.data)
}

// model is what a store must hold after ops: the newest page per address.
type model map[Key]map[uint64]page

func (m model) apply(o op) {
	if m[o.k] == nil {
		m[o.k] = make(map[uint64]page)
	}
	for i := range o.n {
		p := page{flags: o.flags}
		switch {
		case o.zero:
			p = page{flags: FlagPresent, data: make([]byte, PageSize)}
		case o.flags&FlagPresent != 0:
			p.data = o.data[i*PageSize : (i+1)*PageSize]
		}
		m[o.k][o.vaddr+i*PageSize] = p
	}
}

// check compares everything s says with m: Read of every page, the
// counts, and the committed images when commit is set.
func (m model) check(t *testing.T, s *Store, commit bool) {
	t.Helper()
	var want Counts
	for k, pages := range m {
		for vaddr, p := range pages {
			want.Pages++
			buf := make([]byte, PageSize)
			err := s.Read(k, vaddr, buf)
			switch {
			case p.data == nil:
				if p.flags == FlagParent {
					want.ParentPages++
				} else {
					want.LazyPages++
				}
				if !errors.Is(err, ErrNoContent) {
					t.Errorf("read %v %#x (flags %d): %v, want ErrNoContent", k, vaddr, p.flags, err)
				}
			case err != nil:
				t.Errorf("read %v %#x: %v", k, vaddr, err)
			case !bytes.Equal(buf, p.data):
				t.Errorf("read %v %#x: wrong content", k, vaddr)
			}
			if p.data != nil {
				if bytes.Equal(p.data, zeroPage[:]) {
					want.ZeroPages++
				} else {
					want.DataPages++
					want.Bytes += PageSize
				}
			}
		}
	}
	got := s.Stats().Counts
	got.Replaced = 0
	if got != want {
		t.Errorf("counts %+v, want %+v", got, want)
	}
	if !commit {
		return
	}
	if err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	sets := readImages(t, s.cfg.Dir)
	if !slices.Equal(slices.SortedFunc(maps.Keys(sets), compareKeys), slices.SortedFunc(maps.Keys(m), compareKeys)) {
		t.Fatalf("images for %v, want %v", slices.Collect(maps.Keys(sets)), slices.Collect(maps.Keys(m)))
	}
	for k, is := range sets {
		got := is.pagesOf()
		if len(got) != len(m[k]) {
			t.Errorf("%v: %d pages in the images, want %d", k, len(got), len(m[k]))
		}
		for vaddr, p := range m[k] {
			g, ok := got[vaddr]
			if !ok || g.flags != p.flags || !bytes.Equal(g.data, p.data) {
				t.Errorf("%v %#x: image has flags %d (found %v), want %d; data equal: %v",
					k, vaddr, g.flags, ok, p.flags, bytes.Equal(g.data, p.data))
			}
		}
	}
}

func TestAddReadCommit(t *testing.T) {
	half := func(d []byte, i int) []byte { return d[i*PageSize : (i+1)*PageSize] }
	withZero := pattern(3, 5)
	clear(withZero[PageSize : 2*PageSize])
	tests := []struct {
		name    string
		ops     []op
		entries map[Key][]Entry // nil: not checked
		counts  Counts          // Replaced checked only
	}{
		{
			name:    "present",
			ops:     []op{{k: task, vaddr: base, n: 3, flags: FlagPresent, data: pattern(3, 1)}},
			entries: map[Key][]Entry{task: {{base, 3, FlagPresent}}},
		},
		{
			name: "newest copy wins",
			ops: []op{
				{k: task, vaddr: base, n: 4, flags: FlagPresent, data: pattern(4, 1)},
				{k: task, vaddr: base + PageSize, n: 2, flags: FlagPresent, data: pattern(2, 2)},
				{k: task, vaddr: base + PageSize, n: 1, flags: FlagPresent, data: half(pattern(2, 3), 1)},
			},
			entries: map[Key][]Entry{task: {{base, 4, FlagPresent}}},
			counts:  Counts{Replaced: 3},
		},
		{
			name:    "zero page among data",
			ops:     []op{{k: task, vaddr: base, n: 3, flags: FlagPresent | FlagLazy, data: withZero}},
			entries: map[Key][]Entry{task: {{base, 3, FlagPresent | FlagLazy}}},
		},
		{
			name:    "add zero",
			ops:     []op{{k: task, vaddr: base, n: 2, zero: true, flags: FlagPresent}},
			entries: map[Key][]Entry{task: {{base, 2, FlagPresent}}},
		},
		{
			name: "data turns zero then data again",
			ops: []op{
				{k: task, vaddr: base, n: 2, flags: FlagPresent, data: pattern(2, 1)},
				{k: task, vaddr: base, n: 2, zero: true, flags: FlagPresent},
				{k: task, vaddr: base + PageSize, n: 1, flags: FlagPresent, data: pattern(1, 9)},
			},
			entries: map[Key][]Entry{task: {{base, 2, FlagPresent}}},
			counts:  Counts{Replaced: 3},
		},
		{
			name: "lazy and parent have no content",
			ops: []op{
				{k: task, vaddr: base, n: 2, flags: FlagLazy},
				{k: task, vaddr: base + 2*PageSize, n: 1, flags: FlagParent},
				{k: task, vaddr: base + 3*PageSize, n: 1, flags: FlagPresent | FlagLazy, data: pattern(1, 4)},
			},
			entries: map[Key][]Entry{task: {
				{base, 2, FlagLazy}, {base + 2*PageSize, 1, FlagParent}, {base + 3*PageSize, 1, FlagPresent | FlagLazy},
			}},
		},
		{
			name: "present replaces lazy",
			ops: []op{
				{k: task, vaddr: base, n: 3, flags: FlagLazy},
				{k: task, vaddr: base + PageSize, n: 1, flags: FlagPresent | FlagLazy, data: pattern(1, 4)},
			},
			entries: map[Key][]Entry{task: {
				{base, 1, FlagLazy}, {base + PageSize, 1, FlagPresent | FlagLazy}, {base + 2*PageSize, 1, FlagLazy},
			}},
			counts: Counts{Replaced: 1},
		},
		{
			name: "adjacent adds merge, gaps split, order sorted",
			ops: []op{
				{k: task, vaddr: base + 3*PageSize, n: 1, flags: FlagPresent, data: pattern(1, 3)},
				{k: task, vaddr: base + PageSize, n: 1, flags: FlagPresent, data: pattern(1, 2)},
				{k: task, vaddr: base, n: 1, flags: FlagPresent, data: pattern(1, 1)},
			},
			entries: map[Key][]Entry{task: {{base, 2, FlagPresent}, {base + 3*PageSize, 1, FlagPresent}}},
		},
		{
			name: "across a 2 MiB index chunk",
			ops: []op{
				{k: task, vaddr: base + 2<<20 - 2*PageSize, n: 4, flags: FlagPresent, data: pattern(4, 6)},
			},
			entries: map[Key][]Entry{task: {{base + 2<<20 - 2*PageSize, 4, FlagPresent}}},
		},
		{
			name: "keys are separate",
			ops: []op{
				{k: task, vaddr: base, n: 1, flags: FlagPresent, data: pattern(1, 1)},
				{k: task2, vaddr: base, n: 1, flags: FlagPresent, data: pattern(1, 2)},
				{k: shm, vaddr: 0, n: 2, flags: FlagPresent, data: pattern(2, 3)},
			},
			entries: map[Key][]Entry{task: {{base, 1, FlagPresent}}, task2: {{base, 1, FlagPresent}}, shm: {{0, 2, FlagPresent}}},
		},
		{
			name:    "top of the address space",
			ops:     []op{{k: task, vaddr: MaxAddr - PageSize, n: 1, flags: FlagPresent, data: pattern(1, 8)}},
			entries: map[Key][]Entry{task: {{MaxAddr - PageSize, 1, FlagPresent}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestStore(t, Config{})
			m := model{}
			for _, o := range tt.ops {
				if err := o.apply(s); err != nil {
					t.Fatal(err)
				}
				m.apply(o)
			}
			if got := s.Stats().Replaced; got != tt.counts.Replaced {
				t.Errorf("replaced %d, want %d", got, tt.counts.Replaced)
			}
			m.check(t, s, true)
			for k, want := range tt.entries {
				got := readImages(t, s.cfg.Dir)[k].pm.Entries
				if !slices.Equal(got, want) {
					t.Errorf("%v entries %v, want %v", k, got, want)
				}
			}
		})
	}
}

func TestReadNotFound(t *testing.T) {
	s := newTestStore(t, Config{})
	if err := s.Add(task, base, 2, FlagPresent, pattern(2, 1)); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		k     Key
		vaddr uint64
		pages int
	}{
		{"unknown key", task2, base, 1},
		{"before", task, base - PageSize, 1},
		{"after", task, base + 2*PageSize, 1},
		{"straddling the end", task, base + PageSize, 2},
		{"far away", task, 1 << 40, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := s.Read(tt.k, tt.vaddr, make([]byte, tt.pages*PageSize)); !errors.Is(err, ErrNotFound) {
				t.Fatalf("read: %v, want ErrNotFound", err)
			}
		})
	}
}

// TestAgainstModel runs random operations on a small address space and
// compares the store with the model after each batch.
func TestAgainstModel(t *testing.T) {
	for seed := range uint64(8) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			s := newTestStore(t, Config{})
			m := model{}
			keys := []Key{task, task2, shm}
			flagSet := []uint32{FlagPresent, FlagPresent | FlagLazy, FlagLazy, FlagParent}
			for range 300 {
				o := op{k: keys[rng.IntN(len(keys))], vaddr: uint64(rng.IntN(1100)) * PageSize, n: uint64(1 + rng.IntN(40))}
				switch r := rng.IntN(10); {
				case r == 0:
					o.zero, o.flags = true, FlagPresent
				default:
					o.flags = flagSet[rng.IntN(len(flagSet))]
					if o.flags&FlagPresent != 0 {
						o.data = pattern(int(o.n), byte(rng.Uint32()))
						for i := range o.n { // some zero pages
							if rng.IntN(4) == 0 {
								clear(o.data[i*PageSize : (i+1)*PageSize])
							}
						}
					}
				}
				if err := o.apply(s); err != nil {
					t.Fatal(err)
				}
				m.apply(o)
			}
			m.check(t, s, true)
		})
	}
}

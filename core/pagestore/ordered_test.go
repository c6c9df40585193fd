package pagestore

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// dumpOps is what a dump sends for key k: ranges in address order with
// gaps, some zero pages and lazy ranges among them; with resend, a second
// pass re-sends data over data (a pre-copy round) and, with disorder, one
// range out of order, which must turn the key's spool into a plain one.
func dumpOps(rng *rand.Rand, k Key, resend, disorder bool) []op {
	var ops []op
	vaddr := uint64(base)
	var sent []op
	for range 40 {
		vaddr += uint64(rng.IntN(3)) * PageSize // gap
		o := op{k: k, vaddr: vaddr, n: uint64(1 + rng.IntN(24))}
		switch rng.IntN(8) {
		case 0:
			o.flags = FlagLazy
		case 1:
			o.zero, o.flags = true, FlagPresent
		default:
			o.flags = FlagPresent
			o.data = pattern(int(o.n), byte(rng.Uint32()))
			for i := range o.n { // zero pages inside a present range
				if rng.IntN(5) == 0 {
					clear(o.data[i*PageSize : (i+1)*PageSize])
				}
			}
			sent = append(sent, o)
		}
		ops = append(ops, o)
		vaddr += o.n * PageSize
	}
	if resend {
		for _, o := range sent {
			o.data = pattern(int(o.n), byte(rng.Uint32()))
			for i := range o.n { // the same pages zero as before
				if isZero(ops, o.vaddr+i*PageSize) {
					clear(o.data[i*PageSize : (i+1)*PageSize])
				}
			}
			ops = append(ops, o)
		}
	}
	if disorder {
		ops = append(ops, op{k: k, vaddr: base - 8*PageSize, n: 2, flags: FlagPresent, data: pattern(2, 9)})
	}
	return ops
}

// isZero reports whether the newest op covering vaddr recorded it as a zero page.
func isZero(ops []op, vaddr uint64) bool {
	zero := false
	for _, o := range ops {
		if vaddr < o.vaddr || vaddr >= o.vaddr+o.n*PageSize {
			continue
		}
		i := (vaddr - o.vaddr) / PageSize
		zero = o.zero || (o.data != nil && isZeroPage(o.data[i*PageSize:(i+1)*PageSize]))
	}
	return zero
}

func isZeroPage(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// TestOrderedSpoolIsTheImage: a key whose pages come in address order (and
// whose later copies only replace data with data) has its spool linked as
// its pages image, no copy; anything else, a spool on another filesystem,
// or a key beyond the own spools gets a copy. Either way the images hold
// exactly the newest pages.
func TestOrderedSpoolIsTheImage(t *testing.T) {
	shmDir := "/dev/shm"
	tests := []struct {
		name     string
		keys     int
		resend   bool
		disorder bool
		otherFS  bool // spool dir on tmpfs, images on /tmp
		linked   int  // keys whose pages image is their spool
	}{
		{name: "dump", keys: 3, linked: 3},
		{name: "dump then data over data", keys: 3, resend: true, linked: 3},
		{name: "out of order", keys: 2, resend: true, disorder: true, linked: 0},
		{name: "more keys than own spools", keys: maxOwnSpools + 3, linked: maxOwnSpools},
		{name: "spool on another filesystem", keys: 2, otherFS: true, linked: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{}
			if tt.otherFS {
				if sameFS(t, shmDir, os.TempDir()) {
					t.Skipf("SKIP: %s and %s are one filesystem here", shmDir, os.TempDir())
				}
				d, err := os.MkdirTemp(shmDir, "spool")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(d) })
				cfg.SpoolDir = d
			}
			s := newTestStore(t, cfg)
			rng := rand.New(rand.NewPCG(uint64(tt.keys), 7))
			m := model{}
			for i := range tt.keys {
				k := Key{Kind: KindTask, ID: uint64(i + 1)}
				for _, o := range dumpOps(rng, k, tt.resend, tt.disorder) {
					if err := o.apply(s); err != nil {
						t.Fatal(err)
					}
					m.apply(o)
				}
			}
			m.check(t, s, true)
			linked := 0
			for i, k := range s.Keys() {
				p := s.pagemap(k)
				if !p.own {
					continue
				}
				spool, err := p.sp.f.Stat()
				if err != nil {
					t.Fatal(err)
				}
				img, err := os.Stat(filepath.Join(s.cfg.Dir, pagesName(uint32(i+1))))
				if err != nil {
					t.Fatal(err)
				}
				if os.SameFile(spool, img) {
					linked++
				}
			}
			if linked != tt.linked {
				t.Fatalf("%d pages images are their key's spool, want %d", linked, tt.linked)
			}
		})
	}
}

func sameFS(t *testing.T, a, b string) bool {
	t.Helper()
	var sa, sb syscall.Stat_t
	if err := syscall.Stat(a, &sa); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(b, &sb); err != nil {
		t.Fatal(err)
	}
	return sa.Dev == sb.Dev
}

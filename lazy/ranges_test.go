package lazy

import (
	"math/rand/v2"
	"slices"
	"testing"
)

const pg = pageSize

func segsOf(runs ...seg) segs {
	var p segs
	for _, r := range runs {
		p.add(r)
	}
	return p
}

func TestSegsCut(t *testing.T) {
	base := func() segs { return segsOf(seg{10 * pg, 20 * pg, 10 * pg}, seg{30 * pg, 40 * pg, 30 * pg}) }
	tests := []struct {
		name       string
		start, end uint64
		want       []seg
		removed    uint64
	}{
		{"nothing", 0, 10 * pg, []seg{{10 * pg, 20 * pg, 10 * pg}, {30 * pg, 40 * pg, 30 * pg}}, 0},
		{"gap", 20 * pg, 30 * pg, []seg{{10 * pg, 20 * pg, 10 * pg}, {30 * pg, 40 * pg, 30 * pg}}, 0},
		{"head", 5 * pg, 12 * pg, []seg{{12 * pg, 20 * pg, 12 * pg}, {30 * pg, 40 * pg, 30 * pg}}, 2},
		{"middle", 12 * pg, 14 * pg, []seg{{10 * pg, 12 * pg, 10 * pg}, {14 * pg, 20 * pg, 14 * pg}, {30 * pg, 40 * pg, 30 * pg}}, 2},
		{"across", 15 * pg, 35 * pg, []seg{{10 * pg, 15 * pg, 10 * pg}, {35 * pg, 40 * pg, 35 * pg}}, 10},
		{"all", 0, 50 * pg, nil, 20},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := base()
			if got := p.cut(tt.start, tt.end); got != tt.removed {
				t.Errorf("removed %d pages, want %d", got, tt.removed)
			}
			if !slices.Equal(p.runs, tt.want) || p.pages != 20-tt.removed {
				t.Errorf("runs %v (%d pages), want %v", p.runs, p.pages, tt.want)
			}
		})
	}
}

// TestSegsModel applies random cuts and moves to segs and to a map of
// page -> image page, and checks they agree, as do find, mapped and from.
func TestSegsModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		model := map[uint64]uint64{}
		var p segs
		for a := uint64(0); a < 256; {
			n := 1 + rng.Uint64N(16)
			if rng.IntN(3) > 0 {
				p.add(seg{a * pg, (a + n) * pg, a * pg})
				for i := a; i < a+n; i++ {
					model[i] = i
				}
			}
			a += n + rng.Uint64N(4)
		}
		for op := range 30 {
			s, n := rng.Uint64N(600), 1+rng.Uint64N(40)
			if rng.IntN(2) == 0 {
				p.cut(s*pg, (s+n)*pg)
				for i := s; i < s+n; i++ {
					delete(model, i)
				}
			} else {
				to := 1000 + rng.Uint64N(400) // never overlapping the source
				p.move(s*pg, to*pg, n*pg)
				moved := map[uint64]uint64{}
				for i := s; i < s+n; i++ {
					if img, ok := model[i]; ok {
						moved[i-s+to] = img
						delete(model, i)
					}
				}
				for i := to; i < to+n; i++ {
					delete(model, i)
				}
				for k, v := range moved {
					model[k] = v
				}
			}
			checkModel(t, round, op, &p, model)
		}
	}
}

func checkModel(t *testing.T, round, op int, p *segs, model map[uint64]uint64) {
	t.Helper()
	var pages uint64
	for i, r := range p.runs {
		if r.start >= r.end || i > 0 && p.runs[i-1].end > r.start || !p.moved && r.img != r.start {
			t.Fatalf("round %d op %d: bad runs %v", round, op, p.runs)
		}
		pages += r.pages()
		for a := r.start; a < r.end; a += pg {
			if img, ok := model[a/pg]; !ok || img*pg != r.img+(a-r.start) {
				t.Fatalf("round %d op %d: page %d -> %#x, model %v %v", round, op, a/pg, r.img+(a-r.start), img, ok)
			}
		}
	}
	if pages != uint64(len(model)) || p.pages != pages {
		t.Fatalf("round %d op %d: %d pages (counted %d), model %d", round, op, p.pages, pages, len(model))
	}
	for a, img := range model {
		if r, ok := p.find(a * pg); !ok || r.img+(a*pg-r.start) != img*pg {
			t.Fatalf("round %d op %d: find %d: %v %v", round, op, a, r, ok)
		}
		if m, ok := p.mapped(img*pg, img*pg+pg); !ok || m.start != a*pg || m.img != img*pg {
			t.Fatalf("round %d op %d: mapped image page %d: %v %v, want at %d", round, op, img, m, ok, a)
		}
	}
	if r, ok := p.from(300 * pg); ok != (len(model) > 0) || ok && model[r.start/pg]*pg != r.img {
		t.Fatalf("round %d op %d: from: %v %v", round, op, r, ok)
	}
}

package pagestore

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestCopyRuns(t *testing.T) {
	for seed := range uint64(50) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 3))
			var cs []pageCopy
			off, buf := int64(0), 0
			for range 1 + rng.IntN(400) {
				if rng.IntN(8) == 0 {
					off += PageSize * int64(1+rng.IntN(3)) // spool gap
				}
				if rng.IntN(3+int(seed%5)*10) == 0 {
					buf += 1 + rng.IntN(2) // buffer gap
				}
				cs = append(cs, pageCopy{off: off, buf: buf})
				off += PageSize
				buf++
			}
			var all []pageCopy
			err := copyRuns(cs, func(run []pageCopy, contiguous bool) error {
				all = append(all, run...)
				isContiguous := true
				for i := 1; i < len(run); i++ {
					if run[i].off != run[i-1].off+PageSize {
						t.Fatalf("run %v: spool offsets not consecutive", run)
					}
					isContiguous = isContiguous && run[i].buf == run[i-1].buf+1
				}
				if contiguous != isContiguous {
					t.Fatalf("run %v reported contiguous=%v", run, contiguous)
				}
				if !contiguous && len(run) > scratchPages {
					t.Fatalf("gathered run of %d pages, scratch holds %d", len(run), scratchPages)
				}
				return nil
			})
			if err != nil || !slices.Equal(all, cs) {
				t.Fatalf("runs cover %d of %d copies: %v", len(all), len(cs), err)
			}
		})
	}
}

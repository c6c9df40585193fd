package pagestore

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// benchBytes is the memory each benchmark moves: 256 MiB.
const benchBytes = 256 << 20

// benchAddPages is the pages per Add: 256 KiB, a page-server batch.
const benchAddPages = 64

func randomPages(n int) []byte {
	b := make([]byte, n*PageSize)
	rand.NewChaCha8([32]byte{1}).Read(b)
	return b
}

// BenchmarkAdd measures Add throughput for 256 MiB of pages into a fresh
// store, against a baseline measured in the same run: writing the same
// bytes, in the same chunks, to a plain file with WriteAt. Reported: MB/s
// of the store, and x-time-vs-plain-file (store time / baseline).
//
// Memory conditions are equal: each phase removes its file before the next
// starts, so both write into page cache the other just freed (on this VM,
// first-touched memory costs about 2.5 ms/MiB, more than the writes), and
// an untimed plain write warms up first.
func BenchmarkAdd(b *testing.B) {
	for _, tt := range []struct {
		name      string
		zeroEvery int // every zeroEvery-th page is zero; 0: none
	}{{"random", 0}, {"half-zero", 2}} {
		b.Run(tt.name, func(b *testing.B) {
			data := randomPages(benchBytes / PageSize)
			if tt.zeroEvery > 0 {
				for i := 0; i < len(data)/PageSize; i += tt.zeroEvery {
					clear(data[i*PageSize : (i+1)*PageSize])
				}
			}
			b.SetBytes(benchBytes)
			writePlain(b, data)
			var store, base time.Duration
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				base += writePlain(b, data)
				s := newBenchStore(b)
				b.StartTimer()
				t0 := time.Now()
				for off := 0; off < len(data); off += benchAddPages * PageSize {
					if err := s.Add(task, base0+uint64(off), benchAddPages, FlagPresent, data[off:off+benchAddPages*PageSize]); err != nil {
						b.Fatal(err)
					}
				}
				store += time.Since(t0)
				b.StopTimer()
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(store)/float64(base), "x-time-vs-plain-file")
		})
	}
}

const base0 = 0x7f0000000000

// writePlain writes data to a new plain file in chunks as BenchmarkAdd
// adds it, removes the file and returns the time the writes took.
func writePlain(b *testing.B, data []byte) time.Duration {
	b.Helper()
	f, err := os.Create(filepath.Join(b.TempDir(), "plain"))
	if err != nil {
		b.Fatal(err)
	}
	defer func() {
		f.Close()
		os.Remove(f.Name())
	}()
	t0 := time.Now()
	for off := 0; off < len(data); off += benchAddPages * PageSize {
		if _, err := f.WriteAt(data[off:off+benchAddPages*PageSize], int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	return time.Since(t0)
}

func newBenchStore(b *testing.B) *Store {
	b.Helper()
	s, err := New(Config{Dir: filepath.Join(b.TempDir(), "images")})
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkRead measures the latency of random reads (1 and 16 pages) from
// a store holding 256 MiB, as post-copy faults read; ns/op is the latency.
// Baseline in the same run: ReadAt of the same sizes at random offsets of a
// plain file holding the same 256 MiB (both in the page cache). Reported:
// x-time-vs-plain-file.
func BenchmarkRead(b *testing.B) {
	data := randomPages(benchBytes / PageSize)
	s := newBenchStore(b)
	defer s.Close()
	for off := 0; off < len(data); off += benchAddPages * PageSize {
		if err := s.Add(task, base0+uint64(off), benchAddPages, FlagPresent, data[off:off+benchAddPages*PageSize]); err != nil {
			b.Fatal(err)
		}
	}
	plain, err := os.Create(filepath.Join(b.TempDir(), "plain"))
	if err != nil {
		b.Fatal(err)
	}
	defer plain.Close()
	if _, err := plain.Write(data); err != nil {
		b.Fatal(err)
	}
	for _, pages := range []int{1, 16} {
		b.Run(map[int]string{1: "1page", 16: "16pages"}[pages], func(b *testing.B) {
			buf := make([]byte, pages*PageSize)
			nPages := benchBytes/PageSize - pages
			rng := rand.New(rand.NewPCG(1, 2))
			b.SetBytes(int64(len(buf)))
			// Store and baseline alternate in blocks, so both see the
			// same load on a shared machine; only the store is timed by
			// the benchmark.
			var store, base time.Duration
			for done := 0; done < b.N; {
				n := min(1024, b.N-done)
				t0 := time.Now()
				for range n {
					if err := s.Read(task, base0+uint64(rng.IntN(nPages))*PageSize, buf); err != nil {
						b.Fatal(err)
					}
				}
				store += time.Since(t0)
				b.StopTimer()
				t0 = time.Now()
				for range n {
					if _, err := plain.ReadAt(buf, int64(rng.IntN(nPages))*PageSize); err != nil {
						b.Fatal(err)
					}
				}
				base += time.Since(t0)
				b.StartTimer()
				done += n
			}
			b.ReportMetric(float64(store)/float64(base), "x-time-vs-plain-file")
		})
	}
}

// BenchmarkCommit measures Commit of 256 MiB (one page in four zero)
// against a baseline in the same run: writing the same bytes to one plain
// file and fsyncing it. Reported: MB/s and x-time-vs-plain-file.
func BenchmarkCommit(b *testing.B) {
	data := randomPages(benchBytes / PageSize)
	for i := 0; i < len(data)/PageSize; i += 4 {
		clear(data[i*PageSize : (i+1)*PageSize])
	}
	b.SetBytes(benchBytes)
	var store, base time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		t0 := time.Now()
		f, err := os.Create(filepath.Join(b.TempDir(), "plain"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := f.Write(data); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		f.Close()
		base += time.Since(t0)
		s := newBenchStore(b)
		for off := 0; off < len(data); off += benchAddPages * PageSize {
			if err := s.Add(task, base0+uint64(off), benchAddPages, FlagPresent, data[off:off+benchAddPages*PageSize]); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		t0 = time.Now()
		if err := s.Commit(); err != nil {
			b.Fatal(err)
		}
		store += time.Since(t0)
		b.StopTimer()
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(store)/float64(base), "x-time-vs-plain-file")
}

package linux

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// PopulateCost maps size bytes of fresh private anonymous memory, fills
// every page by copying into it as CRIU's restore fills a restored
// mapping, unmaps it and returns how long the fill took. It measures the
// part of a restore that grows with the tree's memory, on this host as it
// is now (a VM pays for guest memory it never touched before).
func PopulateCost(size int) (time.Duration, error) {
	r, d, err := Prefault(size)
	if err != nil {
		return 0, err
	}
	r.Release()
	return d, nil
}

// Reserve is anonymous memory Prefault filled, held until Release.
type Reserve struct{ mem []byte }

// Prefault maps size bytes of fresh private anonymous memory and fills
// every page, as PopulateCost does, but keeps it until Release: memory
// freed just before an allocation is what the kernel hands out, while
// memory freed long before may have gone back to the hypervisor (free page
// reporting) and costs a first touch again.
func Prefault(size int) (*Reserve, time.Duration, error) {
	if size <= 0 || size%unix.Getpagesize() != 0 {
		return nil, 0, fmt.Errorf("prefault: size %d is not a positive multiple of the page size", size)
	}
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, 0, fmt.Errorf("prefault: mmap %d bytes: %w", size, err)
	}
	src := make([]byte, 1<<20)
	for i := range src {
		src[i] = byte(i*7 + i>>12)
	}
	start := time.Now()
	for off := 0; off < size; off += len(src) {
		copy(mem[off:], src)
	}
	return &Reserve{mem: mem}, time.Since(start), nil
}

// Size is the reserve's size in bytes, 0 once released.
func (r *Reserve) Size() int {
	if r == nil {
		return 0
	}
	return len(r.mem)
}

// Release unmaps the reserve; later calls do nothing. A nil reserve is
// released.
func (r *Reserve) Release() {
	if r == nil || r.mem == nil {
		return
	}
	unix.Munmap(r.mem) // our own mapping of a size we chose: cannot fail
	r.mem = nil
}

// MemAvailable returns the kernel's estimate of memory available for new
// allocations without swapping (MemAvailable in /proc/meminfo), in bytes.
func MemAvailable() (uint64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("meminfo: %w", err)
	}
	return parseMemAvailable(string(b))
}

func parseMemAvailable(s string) (uint64, error) {
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "MemAvailable:" && f[2] == "kB" {
			kb, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil || kb > 1<<44 {
				return 0, fmt.Errorf("meminfo: bad MemAvailable %q", f[1])
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("meminfo: no MemAvailable line")
}

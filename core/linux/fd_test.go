package linux

import (
	"os"
	"testing"
)

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestProbesLeakNoFDs runs each probe body uncached, many times.
func TestProbesLeakNoFDs(t *testing.T) {
	probes := map[string]func() error{
		"pagemap-scan": probePagemapScan,
		"soft-dirty":   probeSoftDirty,
		"pidfd":        probePidfdGetfd,
		"uffd":         func() error { _, err := probeUffdFeatures(); return err },
		"freezer-v2":   HaveFreezerV2,
		"freezer-v1":   func() error { _, err := FreezerV1Root(); return err },
		"cpuinfo":      func() error { _, err := ReadCPUInfo(); return err },
	}
	for name, probe := range probes {
		t.Run(name, func(t *testing.T) {
			probe() // warm up lazily opened runtime fds (the poller's epoll)
			before := countFDs(t)
			for range 50 {
				probe()
			}
			if after := countFDs(t); after != before {
				t.Errorf("%d fds before, %d after 50 runs", before, after)
			}
		})
	}
}

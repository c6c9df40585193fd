package linux

import (
	"math/bits"
	"strconv"
	"strings"
)

// UffdFeature is a set of UFFD_FEATURE_* bits as UFFDIO_API reports and
// accepts them.
type UffdFeature uint64

// Feature bits of struct uffdio_api (include/uapi/linux/userfaultfd.h).
// Debian bookworm's 6.1 headers lack the newest ones, so they are spelled out.
const (
	UffdFeaturePagefaultFlagWP  UffdFeature = 1 << 0  // WP register mode on anon memory (5.7)
	UffdFeatureEventFork        UffdFeature = 1 << 1  // fork events (4.11); requesting it needs CAP_SYS_PTRACE
	UffdFeatureEventRemap       UffdFeature = 1 << 2  // mremap events (4.11)
	UffdFeatureEventRemove      UffdFeature = 1 << 3  // madvise(DONTNEED/REMOVE) events (4.11)
	UffdFeatureMissingHugetlbfs UffdFeature = 1 << 4  // MISSING mode on hugetlbfs
	UffdFeatureMissingShmem     UffdFeature = 1 << 5  // MISSING mode on shmem
	UffdFeatureEventUnmap       UffdFeature = 1 << 6  // munmap events (4.11)
	UffdFeatureSigbus           UffdFeature = 1 << 7  // SIGBUS instead of a fault message
	UffdFeatureThreadID         UffdFeature = 1 << 8  // faulting thread id in messages
	UffdFeatureMinorHugetlbfs   UffdFeature = 1 << 9  // MINOR mode on hugetlbfs (5.13)
	UffdFeatureMinorShmem       UffdFeature = 1 << 10 // MINOR mode on shmem (5.14)
	UffdFeatureExactAddress     UffdFeature = 1 << 11 // fault address not page-masked (5.18)
	UffdFeatureWPHugetlbfsShmem UffdFeature = 1 << 12 // WP mode on hugetlbfs and shmem (5.19)
	UffdFeatureWPUnpopulated    UffdFeature = 1 << 13 // WP also marks unpopulated ptes (6.4)
	UffdFeaturePoison           UffdFeature = 1 << 14 // UFFDIO_POISON (6.6)
	UffdFeatureWPAsync          UffdFeature = 1 << 15 // kernel resolves WP faults itself (6.7)
	UffdFeatureMove             UffdFeature = 1 << 16 // UFFDIO_MOVE (6.8)
	uffdFeatureKnown            UffdFeature = 1<<17 - 1
)

// UffdFeatureEvents are the events CRIU's lazy-pages daemon asks for to
// follow a restored process that forks, mremaps, munmaps or drops pages
// ("non-cooperative" userfaultfd, criu check --feature uffd-noncoop).
const UffdFeatureEvents = UffdFeatureEventFork | UffdFeatureEventRemap |
	UffdFeatureEventRemove | UffdFeatureEventUnmap

var uffdFeatureNames = [...]string{
	"PAGEFAULT_FLAG_WP", "EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE",
	"MISSING_HUGETLBFS", "MISSING_SHMEM", "EVENT_UNMAP", "SIGBUS",
	"THREAD_ID", "MINOR_HUGETLBFS", "MINOR_SHMEM", "EXACT_ADDRESS",
	"WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON", "WP_ASYNC", "MOVE",
}

// Has reports whether every bit of want is in f.
func (f UffdFeature) Has(want UffdFeature) bool { return f&want == want }

// Names returns the kernel names of the bits in f ("WP_ASYNC"), lowest bit
// first; an unknown bit is named "bit17" etc.
func (f UffdFeature) Names() []string {
	names := make([]string, 0, bits.OnesCount64(uint64(f)))
	for b := 0; b < 64; b++ {
		if f&(1<<b) == 0 {
			continue
		}
		if b < len(uffdFeatureNames) {
			names = append(names, uffdFeatureNames[b])
		} else {
			names = append(names, "bit"+strconv.Itoa(b))
		}
	}
	return names
}

// String joins Names with "|"; the empty set is "0".
func (f UffdFeature) String() string {
	if f == 0 {
		return "0"
	}
	return strings.Join(f.Names(), "|")
}

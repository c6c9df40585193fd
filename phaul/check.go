package phaul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/linux"
)

// Feature names of CheckItem, in report order.
const (
	FeatureCRIU        = "criu"
	FeatureCRIUCheck   = "criu-check"
	FeatureUffd        = "userfaultfd"
	FeatureUffdWPAsync = "uffd-wp-async"
	FeatureUffdMissing = "uffd-missing"
	FeatureUffdMinor   = "uffd-minor"
	FeatureUffdEvents  = "uffd-events"
	FeaturePagemapScan = "pagemap-scan"
	FeatureSoftDirty   = "soft-dirty"
	FeatureFreezerV1   = "freezer-cgroup-v1"
	FeatureFreezerV2   = "freezer-cgroup-v2"
	FeaturePtraceScope = "ptrace-scope"
	FeaturePidfdGetfd  = "pidfd-getfd"
	FeaturePipeMaxSize = "pipe-max-size"
	// Dirty-page trackers for pre-copy (core/dirty), best first.
	FeatureTrackerUffdWP    = "tracker-uffd-wp"
	FeatureTrackerSoftDirty = "tracker-soft-dirty"
	FeatureTrackerHash      = "tracker-hash"
	FeatureKernel           = "kernel"
	FeatureCPU              = "cpu"
)

// minKernel is the oldest kernel CRIU supports.
var minKernel = linux.KernelVersion{Major: 3, Minor: 11}

// CheckItem is one line of a CheckReport.
type CheckItem struct {
	Feature   string `json:"feature"`   // one of the Feature* names
	Available bool   `json:"available"` // the host has it
	Detail    string `json:"detail"`    // what was found, or why not, and what needs it
	Required  bool   `json:"required"`  // a cold migration cannot run without it
}

// CPU is the part of a host's CPU that decides whether a process may move
// there from another host.
type CPU struct {
	Vendor      string   `json:"vendor"`
	Model       string   `json:"model"`
	FlagsDigest string   `json:"flags_digest"` // linux.FlagsDigest(Flags)
	Flags       []string `json:"flags"`        // sorted
}

// CheckReport is a host's pre-flight report, printed by `phaul check` and
// exchanged by both sides of a migration.
type CheckReport struct {
	Host        string      `json:"host"`
	Kernel      string      `json:"kernel"`                 // uname -r
	CRIUVersion string      `json:"criu_version,omitempty"` // empty when CRIU was not found
	CPU         CPU         `json:"cpu"`
	Items       []CheckItem `json:"items"`
}

// OK reports whether every required item is available.
func (r *CheckReport) OK() bool {
	return len(r.Missing()) == 0
}

// Missing returns the names of the required items that are not available.
func (r *CheckReport) Missing() []string {
	var names []string
	for _, it := range r.Items {
		if it.Required && !it.Available {
			names = append(names, it.Feature)
		}
	}
	return names
}

// Item returns the item named feature and whether the report has it.
func (r *CheckReport) Item(feature string) (CheckItem, bool) {
	for _, it := range r.Items {
		if it.Feature == feature {
			return it, true
		}
	}
	return CheckItem{}, false
}

// CheckConfig configures Check.
type CheckConfig struct {
	CRIUPath string       // --criu; empty: $PHAUL_CRIU, the prefix wrapper, PATH
	Logger   *slog.Logger // nil: discard
}

// Check probes this host: CRIU, the kernel interfaces phaul and CRIU use,
// the kernel and the CPU. A missing feature is an item with Available false
// and the reason in Detail, never an error; the error is only ctx's. Check
// runs `criu check`, which needs root.
func Check(ctx context.Context, cfg CheckConfig) (*CheckReport, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &CheckReport{}
	if h, err := os.Hostname(); err == nil {
		r.Host = h
	}
	add := func(it CheckItem) {
		log.Debug("check", "feature", it.Feature, "available", it.Available, "detail", it.Detail)
		r.Items = append(r.Items, it)
	}

	for _, it := range checkCRIU(ctx, cfg.CRIUPath, log, r) {
		add(it)
	}
	for _, it := range checkUffd() {
		add(it)
	}
	add(probeItem(FeaturePagemapScan, linux.HavePagemapScan(),
		"PAGEMAP_SCAN ioctl: reads and re-protects written pages in one call; with uffd-wp-async it tracks dirty pages for pre-copy"))
	add(probeItem(FeatureSoftDirty, linux.HaveSoftDirty(),
		"pagemap bit 55 is set after a write; CRIU pre-dump --track-mem needs it (phaul can track with uffd-wp-async instead)"))
	add(checkFreezerV1())
	add(checkFreezerV2())
	add(checkPtraceScope())
	add(probeItem(FeaturePidfdGetfd, linux.HavePidfdGetfd(),
		"pidfd_open + pidfd_getfd: copies a userfaultfd out of the target process for dirty tracking"))
	add(checkPipeMaxSize())
	for _, it := range checkTrackers() {
		add(it)
	}
	add(checkKernel(r))
	add(checkCPU(r))

	if err := ctx.Err(); err != nil {
		return r, fmt.Errorf("check: %w", err)
	}
	return r, nil
}

// checkTrackers says which dirty-page trackers (--tracker) work here. A
// target under a seccomp filter falls back from uffd-wp at migration time.
func checkTrackers() []CheckItem {
	why := map[string]string{
		dirty.KindUffdWP:    "userfaultfd write-protect + PAGEMAP_SCAN, injected into the target: exact, cheap (pre-copy's default)",
		dirty.KindSoftDirty: "clear_refs + pagemap bit 55: exact, stops the target's threads each round",
		dirty.KindHash:      "a hash of every page each round: works everywhere, reads all memory every round",
	}
	feature := map[string]string{
		dirty.KindUffdWP: FeatureTrackerUffdWP, dirty.KindSoftDirty: FeatureTrackerSoftDirty, dirty.KindHash: FeatureTrackerHash,
	}
	var items []CheckItem
	for _, k := range dirty.Kinds {
		items = append(items, probeItem(feature[k], dirty.Available(k), why[k]))
	}
	return items
}

// probeItem turns a linux probe's answer into an item that is not required.
func probeItem(feature string, err error, why string) CheckItem {
	if err != nil {
		return CheckItem{Feature: feature, Detail: err.Error()}
	}
	return CheckItem{Feature: feature, Available: true, Detail: why}
}

// checkCRIU locates CRIU, records its version in r and runs criu check.
func checkCRIU(ctx context.Context, path string, log *slog.Logger, r *CheckReport) []CheckItem {
	found := CheckItem{Feature: FeatureCRIU, Required: true}
	checked := CheckItem{Feature: FeatureCRIUCheck, Required: true}
	bin, err := criu.Locate(ctx, path, log)
	if bin != nil && bin.Version != (criu.Version{}) {
		r.CRIUVersion = bin.Version.String()
	}
	switch {
	case err == nil:
		found.Available = true
		found.Detail = fmt.Sprintf("%s (from %s), version %s (need %d.%d+)",
			bin.Path, bin.Source, bin.Version, criu.MinVersion.Major, criu.MinVersion.Minor)
	case errors.Is(err, criu.ErrTooOld):
		found.Detail = fmt.Sprintf("%s (from %s): %v", bin.Path, bin.Source, err)
	default:
		found.Detail = err.Error()
	}
	if bin == nil || bin.Version == (criu.Version{}) {
		checked.Detail = "skipped: no usable criu"
		return []CheckItem{found, checked}
	}
	// A too-old CRIU still says what the kernel lacks.
	if err := bin.Check(ctx); err != nil {
		checked.Detail = err.Error()
	} else {
		checked.Available = true
		checked.Detail = "criu check: kernel has what CRIU needs to dump and restore"
	}
	return []CheckItem{found, checked}
}

// checkUffd reports userfaultfd and the feature groups phaul and CRIU use.
func checkUffd() []CheckItem {
	have, err := linux.UffdFeatures()
	if err != nil {
		items := []CheckItem{{Feature: FeatureUffd, Detail: err.Error() +
			"; lazy (post-copy) migration and uffd dirty tracking need it, cold migration does not"}}
		for _, f := range []string{FeatureUffdWPAsync, FeatureUffdMissing, FeatureUffdMinor, FeatureUffdEvents} {
			items = append(items, CheckItem{Feature: f, Detail: "no userfaultfd"})
		}
		return items
	}
	group := func(feature string, bits linux.UffdFeature, why string) CheckItem {
		if missing := bits &^ have; missing != 0 {
			return CheckItem{Feature: feature, Detail: "kernel lacks " + missing.String() + "; " + why}
		}
		return CheckItem{Feature: feature, Available: true, Detail: bits.String() + ": " + why}
	}
	missing := CheckItem{Feature: FeatureUffdMissing, Available: true,
		Detail: "MISSING mode on anonymous memory: CRIU lazy-pages restore (post-copy); " +
			"shmem: " + yesNo(have.Has(linux.UffdFeatureMissingShmem)) +
			", hugetlbfs: " + yesNo(have.Has(linux.UffdFeatureMissingHugetlbfs)) +
			" (CRIU never restores those lazily)"}
	return []CheckItem{
		{Feature: FeatureUffd, Available: true, Detail: "features " + strings.Join(have.Names(), " ") +
			"; lazy (post-copy) migration and uffd dirty tracking need it, cold migration does not"},
		group(FeatureUffdWPAsync, linux.UffdFeatureWPAsync|linux.UffdFeatureWPUnpopulated,
			"the kernel resolves write-protect faults itself (6.7); phaul's pre-copy dirty tracker"),
		missing,
		group(FeatureUffdMinor, linux.UffdFeatureMinorShmem|linux.UffdFeatureMinorHugetlbfs,
			"minor faults on shmem/hugetlbfs page cache; not used by CRIU or phaul today"),
		group(FeatureUffdEvents, linux.UffdFeatureEvents,
			"non-cooperative events: lazy restore of a tree that forks, mremaps, munmaps or drops pages (EVENT_FORK needs CAP_SYS_PTRACE)"),
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func checkFreezerV1() CheckItem {
	it := CheckItem{Feature: FeatureFreezerV1}
	root, err := linux.FreezerV1Root()
	if err != nil {
		it.Detail = err.Error()
		return it
	}
	it.Available = true
	it.Detail = "mounted at " + root + "; CRIU --freeze-cgroup can freeze a tree in a v1 freezer cgroup (otherwise CRIU stops tasks with ptrace)"
	return it
}

func checkFreezerV2() CheckItem {
	it := CheckItem{Feature: FeatureFreezerV2}
	if err := linux.HaveFreezerV2(); err != nil {
		it.Detail = err.Error()
		return it
	}
	root, err := linux.Cgroup2Root()
	if err != nil {
		it.Detail = err.Error()
		return it
	}
	it.Available = true
	it.Detail = "cgroup2 at " + root + " with cgroup.freeze (5.2+); CRIU --freeze-cgroup can freeze a tree in a v2 cgroup (otherwise CRIU stops tasks with ptrace)"
	return it
}

// criuLazyPipeBytes is the pipe CRIU's own lazy-pages transfer sizes with
// F_SETPIPE_SZ (page-xfer.c: 819 pages, rounded up to a power of two).
const criuLazyPipeBytes = 4 << 20

// checkPipeMaxSize reports fs.pipe-max-size and what it costs: CRIU's lazy
// dump (pre-copy's final dump) gifts a tree's pages into pipes of at most
// that size, one parasite round trip per pipe, and CRIU's own lazy-pages
// serving fails below 4 MiB. Raising it is the operator's choice
// (deploy/sysctl.d); phaul never changes it.
func checkPipeMaxSize() CheckItem {
	it := CheckItem{Feature: FeaturePipeMaxSize}
	n, err := linux.PipeMaxSize()
	if err != nil {
		it.Detail = err.Error()
		return it
	}
	it.Available = n >= criuLazyPipeBytes
	it.Detail = fmt.Sprintf("fs.pipe-max-size %d KiB: CRIU's lazy dump moves a tree's memory in pipes of at most this size (1 GiB: about %d parasite round trips inside the freeze)",
		n>>10, (1<<30)/n)
	if !it.Available {
		it.Detail += "; CRIU's own lazy-pages serving needs 4 MiB (phaul's daemon does not); deploy/sysctl.d/90-phaul-pipe-max-size.conf raises it, if the operator installs it (make sysctl)"
	}
	return it
}

func checkPtraceScope() CheckItem {
	it := CheckItem{Feature: FeaturePtraceScope, Required: true}
	s, err := linux.ReadPtraceScope()
	if err != nil {
		it.Detail = err.Error()
		return it
	}
	it.Available = s.AllowsPrivilegedAttach()
	it.Detail = s.String()
	if s != linux.PtraceScopeNoYama {
		it.Detail = "yama ptrace_scope " + it.Detail
	}
	if it.Available {
		it.Detail += ": root (CAP_SYS_PTRACE) may attach, as CRIU dump/restore and pidfd_getfd need"
	} else {
		it.Detail += ": CRIU cannot seize the tree"
	}
	return it
}

func checkKernel(r *CheckReport) CheckItem {
	it := CheckItem{Feature: FeatureKernel, Required: true}
	rel, err := linux.KernelRelease()
	if err != nil {
		it.Detail = err.Error()
		return it
	}
	r.Kernel = rel
	v, err := linux.ParseKernelVersion(rel)
	if err != nil {
		it.Detail = err.Error()
		return it
	}
	it.Available = v.AtLeast(minKernel.Major, minKernel.Minor)
	it.Detail = fmt.Sprintf("%s (%v); CRIU needs %d.%d+", rel, v, minKernel.Major, minKernel.Minor)
	return it
}

func checkCPU(r *CheckReport) CheckItem {
	it := CheckItem{Feature: FeatureCPU, Required: true}
	ci, err := linux.ReadCPUInfo()
	if err != nil {
		it.Detail = err.Error() + "; the peer cannot compare CPU flags"
		return it
	}
	r.CPU = CPU{Vendor: ci.Vendor, Model: ci.Model, FlagsDigest: ci.FlagsDigest, Flags: ci.Flags}
	it.Available = true
	it.Detail = fmt.Sprintf("%s, %s, %d flags, digest %s", ci.Vendor, ci.Model, len(ci.Flags), ci.FlagsDigest)
	return it
}

// ErrCPUIncompatible is wrapped by CPUCompatible's error.
var ErrCPUIncompatible = errors.New("phaul: destination CPU lacks source CPU features")

// maxListedFlags caps the flags named in CPUCompatible's error.
const maxListedFlags = 20

// CPUCompatible reports whether a process may move from a host with CPU
// src to one with CPU dst: every flag of src must be in dst, since code
// (glibc's ifuncs, JITs) picks instructions once by the flags it saw. The
// error wraps ErrCPUIncompatible and names up to 20 missing flags. Vendor
// and model are not compared.
func CPUCompatible(src, dst CPU) error {
	if len(src.Flags) == 0 || len(dst.Flags) == 0 {
		return fmt.Errorf("%w: a host reported no CPU flags", ErrCPUIncompatible)
	}
	have := make(map[string]bool, len(dst.Flags))
	for _, f := range dst.Flags {
		have[f] = true
	}
	var missing []string
	for _, f := range src.Flags {
		if !have[f] {
			missing = append(missing, f)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	slices.Sort(missing)
	list := strings.Join(missing[:min(len(missing), maxListedFlags)], " ")
	if n := len(missing) - maxListedFlags; n > 0 {
		list += fmt.Sprintf(" and %d more", n)
	}
	return fmt.Errorf("%w: %d missing: %s", ErrCPUIncompatible, len(missing), list)
}

package phaul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var reportOrder = []string{
	FeatureCRIU, FeatureCRIUCheck, FeatureUffd, FeatureUffdWPAsync, FeatureUffdMissing,
	FeatureUffdMinor, FeatureUffdEvents, FeaturePagemapScan, FeatureSoftDirty,
	FeatureFreezerV1, FeatureFreezerV2, FeaturePtraceScope, FeaturePidfdGetfd, FeaturePipeMaxSize,
	FeatureTrackerUffdWP, FeatureTrackerSoftDirty, FeatureTrackerHash,
	FeatureKernel, FeatureCPU,
}

// TestCheckThisHost runs Check with a --criu that does not exist (so the
// answer does not depend on what is installed) and compares every kernel
// item with the core/linux probe behind it.
func TestCheckThisHost(t *testing.T) {
	missingCRIU := filepath.Join(t.TempDir(), "no-criu")
	r, err := Check(context.Background(), CheckConfig{CRIUPath: missingCRIU})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, it := range r.Items {
		names = append(names, it.Feature)
		t.Logf("%-18s %-5v %s", it.Feature, it.Available, it.Detail)
		if it.Detail == "" {
			t.Errorf("%s: empty detail", it.Feature)
		}
	}
	if !slices.Equal(names, reportOrder) {
		t.Fatalf("items %v, want %v", names, reportOrder)
	}

	item := func(name string) CheckItem {
		t.Helper()
		it, ok := r.Item(name)
		if !ok {
			t.Fatalf("no item %s", name)
		}
		return it
	}
	if it := item(FeatureCRIU); it.Available || !it.Required || !strings.Contains(it.Detail, missingCRIU) {
		t.Errorf("criu item %+v: want unavailable, required, naming %s", it, missingCRIU)
	}
	if it := item(FeatureCRIUCheck); it.Available || !it.Required {
		t.Errorf("criu-check item %+v: want unavailable (skipped), required", it)
	}
	if r.OK() || !slices.Contains(r.Missing(), FeatureCRIU) {
		t.Errorf("OK() with no criu; missing %v", r.Missing())
	}

	probes := []struct {
		feature string
		probe   func() error
	}{
		{FeatureUffd, linux.HaveUserfaultfd},
		{FeatureUffdWPAsync, linux.HaveUffdWPAsync},
		{FeatureUffdEvents, func() error { return linux.HaveUffdFeatures(linux.UffdFeatureEvents) }},
		{FeaturePagemapScan, linux.HavePagemapScan},
		{FeatureSoftDirty, linux.HaveSoftDirty},
		{FeaturePidfdGetfd, linux.HavePidfdGetfd},
		{FeatureTrackerUffdWP, func() error { return dirty.Available(dirty.KindUffdWP) }},
		{FeatureTrackerSoftDirty, func() error { return dirty.Available(dirty.KindSoftDirty) }},
		{FeatureTrackerHash, func() error { return dirty.Available(dirty.KindHash) }},
		{FeatureFreezerV2, linux.HaveFreezerV2},
		{FeatureFreezerV1, func() error { _, err := linux.FreezerV1Root(); return err }},
	}
	for _, p := range probes {
		err := p.probe()
		if err != nil && !errors.Is(err, linux.ErrNotSupported) {
			t.Errorf("%s: probe failed: %v", p.feature, err)
			continue
		}
		it := item(p.feature)
		if it.Available != (err == nil) || it.Required {
			t.Errorf("%s item %+v, probe says %v; want optional", p.feature, it, err)
		}
	}

	// The userfaultfd item lists the features the kernel offers, WP_ASYNC
	// among them exactly when the probe finds it (a kernel version proves
	// nothing: seccomp, sysctls and architectures decide too).
	if d := item(FeatureUffd).Detail; item(FeatureUffd).Available && strings.Contains(d, "WP_ASYNC") != (linux.HaveUffdWPAsync() == nil) {
		t.Errorf("userfaultfd detail %q, WP_ASYNC probe %v", d, linux.HaveUffdWPAsync())
	}
	for _, p := range []struct {
		feature string
		probe   func() error
	}{
		{FeatureUffd, linux.HaveUserfaultfd},
		{FeatureUffdWPAsync, linux.HaveUffdWPAsync},
		{FeaturePagemapScan, linux.HavePagemapScan},
	} {
		if it := item(p.feature); it.Available != (p.probe() == nil) {
			t.Errorf("%s item %+v, probe says %v", p.feature, it, p.probe())
		}
	}
	// Soft-dirty off (CONFIG_MEM_SOFT_DIRTY=n on the project VM) is an
	// unavailable item that says why, not a failure.
	if sd := item(FeatureSoftDirty); !sd.Available && !strings.Contains(sd.Detail, "bit 55") {
		t.Errorf("soft-dirty unavailable without the reason: %q", sd.Detail)
	}

	if n, err := linux.PipeMaxSize(); err == nil {
		it := item(FeaturePipeMaxSize)
		if it.Required || it.Available != (n >= 4<<20) || !strings.Contains(it.Detail, fmt.Sprintf("%d KiB", n>>10)) {
			t.Errorf("pipe-max-size item %+v, fs.pipe-max-size %d", it, n)
		}
	}
	if it := item(FeatureKernel); !it.Available || !it.Required || r.Kernel == "" {
		t.Errorf("kernel item %+v, report kernel %q", it, r.Kernel)
	}
	// Flags come from "flags" (x86) or "Features" (arm64); other
	// architectures may list none, which is no failure.
	if it := item(FeatureCPU); !it.Available || (len(r.CPU.Flags) == 0 && cpuinfoListsFlags(t)) || r.CPU.FlagsDigest != linux.FlagsDigest(r.CPU.Flags) {
		t.Errorf("cpu item %+v, report cpu %+v", it, r.CPU)
	}
	if it := item(FeaturePtraceScope); !it.Required {
		t.Errorf("ptrace-scope item %+v: want required", it)
	}
	if err := CPUCompatible(r.CPU, r.CPU); err != nil {
		t.Errorf("CPU incompatible with itself: %v", err)
	}

	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{`"host":`, `"kernel":`, `"cpu":{"vendor":`, `"flags_digest":`, `"items":[{"feature":"criu","available":false,"detail":`, `"required":true`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("JSON lacks %s: %s", key, b)
		}
	}
}

func TestCheckCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r, err := Check(ctx, CheckConfig{CRIUPath: filepath.Join(t.TempDir(), "no-criu")})
	if !errors.Is(err, context.Canceled) || r == nil {
		t.Errorf("Check(cancelled) = %v, %v; want a report and context.Canceled", r, err)
	}
}

// TestCheckWithCRIU runs the CRIU items against whatever CRIU Locate finds.
func TestCheckWithCRIU(t *testing.T) {
	r, err := Check(context.Background(), CheckConfig{CRIUPath: testenv.RequireCRIU(t)})
	if err != nil {
		t.Fatal(err)
	}
	if it, _ := r.Item(FeatureCRIU); !it.Available || r.CRIUVersion == "" {
		t.Errorf("criu item %+v, version %q", it, r.CRIUVersion)
	}
	it, _ := r.Item(FeatureCRIUCheck)
	t.Logf("criu-check: %v %s", it.Available, it.Detail)
}

func TestReportOK(t *testing.T) {
	tests := []struct {
		name    string
		items   []CheckItem
		want    bool
		missing []string
	}{
		{"empty", nil, true, nil},
		{"optional missing", []CheckItem{{Feature: "a", Required: false}}, true, nil},
		{"required present", []CheckItem{{Feature: "a", Available: true, Required: true}}, true, nil},
		{"required missing", []CheckItem{
			{Feature: "a", Available: true, Required: true},
			{Feature: "b", Required: true},
			{Feature: "c"},
			{Feature: "d", Required: true},
		}, false, []string{"b", "d"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &CheckReport{Items: tt.items}
			if got := r.OK(); got != tt.want || !slices.Equal(r.Missing(), tt.missing) {
				t.Errorf("OK() = %v, Missing() = %v; want %v, %v", got, r.Missing(), tt.want, tt.missing)
			}
		})
	}
}

func TestCPUCompatible(t *testing.T) {
	cpu := func(flags ...string) CPU {
		return CPU{Vendor: "GenuineIntel", Flags: flags, FlagsDigest: linux.FlagsDigest(flags)}
	}
	many := func(prefix string, n int) []string {
		var fs []string
		for i := range n {
			fs = append(fs, fmt.Sprintf("%s%02d", prefix, i))
		}
		return fs
	}
	tests := []struct {
		name     string
		src, dst CPU
		wantErr  bool
		mention  []string // in the error
		absent   []string // not in the error
	}{
		{name: "same", src: cpu("fpu", "sse2", "avx2"), dst: cpu("fpu", "sse2", "avx2")},
		{name: "destination has more", src: cpu("fpu", "sse2"), dst: cpu("avx512f", "fpu", "sse2")},
		{name: "vendor differs, flags fit", src: cpu("fpu"), dst: CPU{Vendor: "AuthenticAMD", Flags: []string{"fpu"}}},
		{
			name: "destination lacks two", src: cpu("fpu", "sse2", "avx2", "avx512f"), dst: cpu("fpu", "sse2"),
			wantErr: true, mention: []string{"2 missing", "avx2 avx512f"}, absent: []string{"sse2"},
		},
		{
			name: "list capped at 20", src: cpu(append(many("f", 25), "fpu")...), dst: cpu("fpu"),
			wantErr: true, mention: []string{"25 missing", "f00", "f19", "and 5 more"}, absent: []string{"f20", "fpu"},
		},
		{
			name: "digest that lies is not trusted", src: CPU{Flags: []string{"avx2"}, FlagsDigest: "x"},
			dst: CPU{Flags: []string{"fpu"}, FlagsDigest: "x"}, wantErr: true, mention: []string{"avx2"},
		},
		{name: "source without flags", src: CPU{}, dst: cpu("fpu"), wantErr: true, mention: []string{"no CPU flags"}},
		{name: "destination without flags", src: cpu("fpu"), dst: CPU{}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CPUCompatible(tt.src, tt.dst)
			if (err != nil) != tt.wantErr {
				t.Fatalf("CPUCompatible = %v, want error %v", err, tt.wantErr)
			}
			if err == nil {
				return
			}
			if !errors.Is(err, ErrCPUIncompatible) {
				t.Errorf("%v does not wrap ErrCPUIncompatible", err)
			}
			for _, s := range tt.mention {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("%q lacks %q", err, s)
				}
			}
			for _, s := range tt.absent {
				if strings.Contains(err.Error(), " "+s+" ") || strings.HasSuffix(err.Error(), " "+s) {
					t.Errorf("%q names %q", err, s)
				}
			}
		})
	}
}

// cpuinfoListsFlags reports whether /proc/cpuinfo has a line of CPU flags
// that ParseCPUInfo reads.
func cpuinfoListsFlags(t *testing.T) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, _, ok := strings.Cut(line, ":"); ok {
			if k = strings.TrimSpace(k); k == "flags" || k == "Features" {
				return true
			}
		}
	}
	return false
}

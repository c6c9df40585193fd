package linux

import (
	"slices"
	"strings"
	"testing"
)

func TestParseCPUInfo(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		vendor  string
		model   string
		flags   []string
		wantErr bool
	}{
		{
			name: "x86 two processors, intersection",
			in: "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: sse2 fpu avx2 sse2\n\n" +
				"processor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx512f\n",
			vendor: "AuthenticAMD", model: "AMD EPYC", flags: []string{"fpu", "sse2"},
		},
		{
			name:   "arm64",
			in:     "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd aes\nCPU implementer\t: 0x41\n",
			vendor: "0x41", flags: []string{"aes", "asimd", "fp"},
		},
		{name: "no flags", in: "processor\t: 0\nvendor_id\t: X\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ci, err := ParseCPUInfo(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseCPUInfo: %v", err)
			}
			if err != nil {
				return
			}
			if ci.Vendor != tt.vendor || ci.Model != tt.model || !slices.Equal(ci.Flags, tt.flags) {
				t.Errorf("got %+v, want %s %q %v", ci, tt.vendor, tt.model, tt.flags)
			}
			if len(ci.FlagsDigest) != 16 || ci.FlagsDigest != FlagsDigest(tt.flags) {
				t.Errorf("digest %q", ci.FlagsDigest)
			}
		})
	}
}

func TestFlagsDigest(t *testing.T) {
	a := FlagsDigest([]string{"sse2", "fpu", "avx"})
	if b := FlagsDigest([]string{"avx", "fpu", "sse2", "fpu"}); a != b {
		t.Errorf("order or duplicates change the digest: %s %s", a, b)
	}
	if c := FlagsDigest([]string{"avx", "fpu"}); a == c {
		t.Error("different sets, same digest")
	}
	// Pinned: both hosts of a migration compute it, possibly with different
	// builds. Want: echo -n "fpu sse2" | sha256sum | cut -c1-16.
	if got, want := FlagsDigest([]string{"fpu", "sse2"}), "0b26786f4e10f78a"; got != want {
		t.Errorf("FlagsDigest(fpu sse2) = %s, want %s", got, want)
	}
}

func TestReadCPUInfo(t *testing.T) {
	ci, err := ReadCPUInfo()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s / %s / %d flags / %s", ci.Vendor, ci.Model, len(ci.Flags), ci.FlagsDigest)
	if len(ci.Flags) == 0 || !slices.IsSorted(ci.Flags) {
		t.Errorf("flags %v", ci.Flags)
	}
}

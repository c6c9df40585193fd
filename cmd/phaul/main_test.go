package main

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/phaul"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in      string
		want    uint64
		wantErr bool
	}{
		{"4096", 4096, false},
		{"64K", 64 << 10, false},
		{"16M", 16 << 20, false},
		{"16m", 16 << 20, false},
		{"1G", 1 << 30, false},
		{"2GB", 2 << 30, false},
		{"", 0, true},
		{"M", 0, true},
		{"-1M", 0, true},
		{"1.5M", 0, true},
		{"99999999999999999999G", 0, true},
		{"17179869184G", 0, true}, // overflows u64
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseSize(tt.in)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("parseSize(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestProgressBar(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "progress")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if newProgressBar(f) != nil {
		t.Fatal("a progress bar on a regular file: want none (logs carry progress)")
	}
	p := &progressBar{out: f, since: time.Now().Add(-time.Second)}
	p.phase = phaul.PhaseTransfer
	p.update(phaul.Event{Phase: phaul.PhaseTransfer, Bytes: 64 << 20, Elapsed: 2 * time.Second})
	p.done()
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"transfer", "2.0s", "64.0 MiB", "MiB/s"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("progress line %q lacks %q", b, want)
		}
	}
}

func TestBareManageCgroups(t *testing.T) {
	tests := []struct{ in, want []string }{
		{[]string{"phaul", "migrate", "--manage-cgroups", "42"}, []string{"phaul", "migrate", "--manage-cgroups=soft", "42"}},
		{[]string{"phaul", "migrate", "--manage-cgroups", "--to", "h:1", "42"}, []string{"phaul", "migrate", "--manage-cgroups=soft", "--to", "h:1", "42"}},
		{[]string{"phaul", "migrate", "--manage-cgroups", "full", "42"}, []string{"phaul", "migrate", "--manage-cgroups", "full", "42"}},
		{[]string{"phaul", "migrate", "--manage-cgroups=strict", "42"}, []string{"phaul", "migrate", "--manage-cgroups=strict", "42"}},
		{[]string{"phaul", "migrate", "42", "--manage-cgroups"}, []string{"phaul", "migrate", "42", "--manage-cgroups=soft"}},
		{[]string{"phaul", "migrate", "--", "--manage-cgroups"}, []string{"phaul", "migrate", "--", "--manage-cgroups"}},
	}
	for _, tt := range tests {
		if got := bareManageCgroups(tt.in); !slices.Equal(got, tt.want) {
			t.Errorf("bareManageCgroups(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

package linux

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// CPUInfo summarises /proc/cpuinfo for comparing two hosts.
type CPUInfo struct {
	Vendor string // vendor_id ("GenuineIntel", "AuthenticAMD"); arm64: CPU implementer
	Model  string // model name
	// Flags are the feature flags every processor lists ("flags", or
	// "Features" on arm64), sorted and without duplicates.
	Flags []string
	// FlagsDigest is the first 16 hex digits of the SHA-256 of Flags joined
	// by single spaces: equal digests mean equal flag sets.
	FlagsDigest string
}

// ReadCPUInfo parses /proc/cpuinfo.
func ReadCPUInfo() (*CPUInfo, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return nil, fmt.Errorf("read cpuinfo: %w", err)
	}
	defer f.Close()
	return ParseCPUInfo(f)
}

// ParseCPUInfo parses text in /proc/cpuinfo format. Vendor and Model come
// from the first processor; Flags are the intersection over all processors,
// which is what a migrated process may rely on.
func ParseCPUInfo(r io.Reader) (*CPUInfo, error) {
	var (
		ci    CPUInfo
		flags map[string]bool // intersection so far; nil before the first list
	)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20) // flags lines exceed 4 KiB
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		switch key {
		case "vendor_id", "CPU implementer":
			if ci.Vendor == "" {
				ci.Vendor = val
			}
		case "model name":
			if ci.Model == "" {
				ci.Model = val
			}
		case "flags", "Features":
			cur := map[string]bool{}
			for _, fl := range strings.Fields(val) {
				if flags == nil || flags[fl] {
					cur[fl] = true
				}
			}
			flags = cur
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("parse cpuinfo: %w", err)
	}
	if flags == nil {
		return nil, fmt.Errorf("parse cpuinfo: no flags line")
	}
	ci.Flags = make([]string, 0, len(flags))
	for fl := range flags {
		ci.Flags = append(ci.Flags, fl)
	}
	slices.Sort(ci.Flags)
	ci.FlagsDigest = FlagsDigest(ci.Flags)
	return &ci, nil
}

// FlagsDigest returns the first 16 hex digits of the SHA-256 of the sorted,
// deduplicated flags joined by single spaces. flags is not modified.
func FlagsDigest(flags []string) string {
	s := slices.Clone(flags)
	slices.Sort(s)
	s = slices.Compact(s)
	sum := sha256.Sum256([]byte(strings.Join(s, " ")))
	return hex.EncodeToString(sum[:8])
}

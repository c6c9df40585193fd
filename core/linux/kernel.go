package linux

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// KernelVersion is a parsed kernel release: "6.18.44-fc-v782" is {6, 18, 44}.
type KernelVersion struct {
	Major, Minor, Patch int
}

// String returns "major.minor.patch".
func (v KernelVersion) String() string {
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
}

// AtLeast reports whether v is major.minor or newer.
func (v KernelVersion) AtLeast(major, minor int) bool {
	if v.Major != major {
		return v.Major > major
	}
	return v.Minor >= minor
}

// KernelRelease returns the running kernel's release string (uname -r).
func KernelRelease() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Release[:]), nil
}

// Hostname returns the node name from uname(2).
func Hostname() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", fmt.Errorf("uname: %w", err)
	}
	return unix.ByteSliceToString(u.Nodename[:]), nil
}

// RunningKernel returns the parsed version of the running kernel.
func RunningKernel() (KernelVersion, error) {
	rel, err := KernelRelease()
	if err != nil {
		return KernelVersion{}, err
	}
	return ParseKernelVersion(rel)
}

// KernelAtLeast reports whether the running kernel is major.minor or newer.
func KernelAtLeast(major, minor int) (bool, error) {
	v, err := RunningKernel()
	if err != nil {
		return false, err
	}
	return v.AtLeast(major, minor), nil
}

// ParseKernelVersion parses the leading "X.Y[.Z]" of a kernel release; the
// rest ("-generic", "+", "-rc3") is ignored. A missing patch level is 0.
func ParseKernelVersion(release string) (KernelVersion, error) {
	end := strings.IndexFunc(release, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if end < 0 {
		end = len(release)
	}
	parts := strings.Split(strings.TrimSuffix(release[:end], "."), ".")
	if len(parts) < 2 || len(parts) > 3 {
		return KernelVersion{}, fmt.Errorf("parse kernel release %q: want X.Y[.Z]", release)
	}
	var n [3]int
	for i, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil {
			return KernelVersion{}, fmt.Errorf("parse kernel release %q: %w", release, err)
		}
		n[i] = v
	}
	return KernelVersion{Major: n[0], Minor: n[1], Patch: n[2]}, nil
}

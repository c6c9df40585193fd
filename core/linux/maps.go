package linux

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mapping is one line of /proc/PID/maps: [Start, End) with its
// permissions ("rwxp" form), file offset, inode and path (or a [name],
// or "" for anonymous memory).
type Mapping struct {
	Start, End uint64
	Perms      string
	Offset     uint64
	Inode      uint64
	Path       string
	// VMFlags is the VmFlags line of smaps: two-letter flags separated
	// by spaces ("rd wr mr mw me ac dp"; see proc(5)). Only ReadSmaps
	// and ParseSmaps fill it.
	VMFlags string
}

// Private reports a private (copy-on-write) mapping.
func (m Mapping) Private() bool { return len(m.Perms) == 4 && m.Perms[3] == 'p' }

// Special reports one of the kernel's own mappings that CRIU recognises
// by name (criu/proc_parse.c, handle_vma): [vdso], [vvar], [vvar_vclock]
// (Linux 6.13), [vsyscall], [vectors] (arm) and [uprobes]. Any other
// [name] is the process's memory to CRIU, and so here: [heap], [stack],
// and [anon:NAME], anonymous memory named with PR_SET_VMA_ANON_NAME.
func (m Mapping) Special() bool {
	switch m.Path {
	case "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[vectors]", "[uprobes]":
		return true
	}
	return false
}

// HasVMFlag reports whether VMFlags holds flag, two letters ("dp").
func (m Mapping) HasVMFlag(flag string) bool { return slices.Contains(strings.Fields(m.VMFlags), flag) }

// Droppable reports a MAP_DROPPABLE mapping (VmFlags "dp", Linux 6.11):
// the kernel may drop its pages under memory pressure, and they read back
// as zeros. Known only from ReadSmaps.
func (m Mapping) Droppable() bool { return m.HasVMFlag("dp") }

// HaveDroppable reports whether mmap knows MAP_DROPPABLE (Linux 6.11,
// 64-bit). Without it no mapping is droppable, and ReadMaps tells all
// that ReadSmaps would of which mappings hold the process's memory.
var HaveDroppable = newProbe("MAP_DROPPABLE", "6.11", probeDroppable)

func probeDroppable() error {
	b, err := unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_DROPPABLE|unix.MAP_ANONYMOUS)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
		// An unknown mapping type; EOPNOTSUPP on 32-bit kernels.
		return fmt.Errorf("%w: mmap: %w", ErrNotSupported, err)
	}
	if err != nil {
		return fmt.Errorf("mmap MAP_DROPPABLE: %w", err)
	}
	return unix.Munmap(b)
}

// ReadMaps reads /proc/PID/maps.
func ReadMaps(pid int) ([]Mapping, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, fmt.Errorf("maps of %d: %w", pid, err)
	}
	defer f.Close()
	ms, err := ParseMaps(f)
	if err != nil {
		return nil, fmt.Errorf("maps of %d: %w", pid, err)
	}
	return ms, nil
}

// ReadSmaps reads /proc/PID/smaps: the mappings of ReadMaps with their
// VMFlags. The kernel walks the page tables of every mapping to write it
// (about 6 ms per GiB resident), so it costs more than ReadMaps.
func ReadSmaps(pid int) ([]Mapping, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, fmt.Errorf("smaps of %d: %w", pid, err)
	}
	defer f.Close()
	ms, err := ParseSmaps(f)
	if err != nil {
		return nil, fmt.Errorf("smaps of %d: %w", pid, err)
	}
	return ms, nil
}

// ParseMaps parses the /proc/PID/maps format.
func ParseMaps(r io.Reader) ([]Mapping, error) {
	var ms []Mapping
	err := eachLine(r, func(line string) error {
		m, err := parseMapsLine(line)
		ms = append(ms, m)
		return err
	})
	if err != nil {
		return nil, err
	}
	return ms, nil
}

// ParseSmaps parses the /proc/PID/smaps format: a maps line per mapping,
// each followed by "Key: value" lines, of which it keeps VmFlags.
func ParseSmaps(r io.Reader) ([]Mapping, error) {
	var ms []Mapping
	err := eachLine(r, func(line string) error {
		key, val, _ := strings.Cut(line, " ")
		if !strings.HasSuffix(key, ":") {
			m, err := parseMapsLine(line)
			ms = append(ms, m)
			return err
		}
		if len(ms) == 0 {
			return fmt.Errorf("smaps line %q: before any mapping", line)
		}
		if key == "VmFlags:" {
			ms[len(ms)-1].VMFlags = strings.TrimSpace(val)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ms, nil
}

// eachLine calls fn with every line of r until fn fails.
func eachLine(r io.Reader, fn func(line string) error) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		if err := fn(sc.Text()); err != nil {
			return err
		}
	}
	return sc.Err()
}

// parseMapsLine parses "start-end perms offset dev inode [path]".
func parseMapsLine(line string) (Mapping, error) {
	f := strings.Fields(line)
	if len(f) < 5 {
		return Mapping{}, fmt.Errorf("maps line %q: too few fields", line)
	}
	var m Mapping
	se := strings.SplitN(f[0], "-", 2)
	var err1, err2, err3, err4 error
	if len(se) == 2 {
		m.Start, err1 = strconv.ParseUint(se[0], 16, 64)
		m.End, err2 = strconv.ParseUint(se[1], 16, 64)
	} else {
		err1 = fmt.Errorf("range %q", f[0])
	}
	m.Perms = f[1]
	m.Offset, err3 = strconv.ParseUint(f[2], 16, 64)
	m.Inode, err4 = strconv.ParseUint(f[4], 10, 64)
	for _, err := range []error{err1, err2, err3, err4} {
		if err != nil {
			return Mapping{}, fmt.Errorf("maps line %q: %w", line, err)
		}
	}
	if m.End <= m.Start || len(m.Perms) != 4 {
		return Mapping{}, fmt.Errorf("maps line %q: bad range or permissions", line)
	}
	if len(f) > 5 {
		// The path is the rest of the line after the fifth field, and
		// may hold spaces.
		rest := line
		for range 5 {
			rest = strings.TrimLeft(rest, " \t")
			rest = rest[strings.IndexAny(rest+" ", " \t"):]
		}
		m.Path = strings.TrimSpace(rest)
	}
	return m, nil
}

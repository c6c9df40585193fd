package linux

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
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
}

// Private reports a private (copy-on-write) mapping.
func (m Mapping) Private() bool { return len(m.Perms) == 4 && m.Perms[3] == 'p' }

// Special reports a mapping the kernel provides ([vdso], [vvar],
// [vsyscall], ...), whose pages are not the process's data; [heap] and
// [stack] are not special.
func (m Mapping) Special() bool {
	switch m.Path {
	case "[heap]", "[stack]":
		return false
	}
	return strings.HasPrefix(m.Path, "[") && strings.HasSuffix(m.Path, "]")
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

// ParseMaps parses the /proc/PID/maps format.
func ParseMaps(r io.Reader) ([]Mapping, error) {
	var ms []Mapping
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		// start-end perms offset dev inode [path]
		f := strings.Fields(line)
		if len(f) < 5 {
			return nil, fmt.Errorf("maps line %q: too few fields", line)
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
				return nil, fmt.Errorf("maps line %q: %w", line, err)
			}
		}
		if m.End <= m.Start || len(m.Perms) != 4 {
			return nil, fmt.Errorf("maps line %q: bad range or permissions", line)
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
		ms = append(ms, m)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return ms, nil
}

package linux

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// mount is one line of /proc/PID/mountinfo (proc(5)).
type mount struct {
	root, point, fstype string
	superOpts           []string
}

// parseMountinfo reads mountinfo lines: "id parent maj:min root point opts
// [optional...] - fstype source superopts".
func parseMountinfo(r io.Reader) ([]mount, error) {
	var ms []mount
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := slices.Index(f, "-")
		if sep < 6 || len(f) < sep+4 {
			return nil, fmt.Errorf("parse mountinfo: malformed line %q", sc.Text())
		}
		ms = append(ms, mount{
			root:      unescapeMount(f[3]),
			point:     unescapeMount(f[4]),
			fstype:    f[sep+1],
			superOpts: strings.Split(f[sep+3], ","),
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("parse mountinfo: %w", err)
	}
	return ms, nil
}

// unescapeMount undoes the kernel's octal escapes (\040 for a space, ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

func readMounts() ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	return parseMountinfo(f)
}

// findMount returns the mount point of the first mount that match accepts,
// preferring one of the hierarchy's root ("/") over bind mounts of a subtree.
func findMount(ms []mount, match func(mount) bool) (string, bool) {
	sub := ""
	for _, m := range ms {
		if !match(m) {
			continue
		}
		if m.root == "/" {
			return m.point, true
		}
		if sub == "" {
			sub = m.point
		}
	}
	return sub, sub != ""
}

func isFreezerV1(m mount) bool {
	return m.fstype == "cgroup" && slices.Contains(m.superOpts, "freezer")
}

func isCgroup2(m mount) bool { return m.fstype == "cgroup2" }

func isCPUV1(m mount) bool {
	return m.fstype == "cgroup" && slices.Contains(m.superOpts, "cpu")
}

// CPUV1Root returns where the cgroup v1 cpu controller's hierarchy is
// mounted (/sys/fs/cgroup/cpu, or cpu,cpuacct). The error wraps
// ErrNotSupported when none is.
func CPUV1Root() (string, error) {
	ms, err := readMounts()
	if err != nil {
		return "", err
	}
	if p, ok := findMount(ms, isCPUV1); ok {
		return p, nil
	}
	return "", fmt.Errorf("cgroup v1 cpu: %w: not mounted", ErrNotSupported)
}

// ProcessCgroupV1 returns the path of pid's cgroup in the v1 hierarchy of
// controller, relative to the hierarchy's root, from /proc/PID/cgroup.
func ProcessCgroupV1(pid int, controller string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", fmt.Errorf("cgroups of %d: %w", pid, err)
	}
	return parseProcCgroup(string(b), controller)
}

// ProcessCgroup2 returns the path of pid's cgroup in the v2 hierarchy, the
// "0::PATH" line of /proc/PID/cgroup.
func ProcessCgroup2(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", fmt.Errorf("cgroups of %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("cgroups of %d: %w: no cgroup2 line", pid, ErrNotSupported)
}

// parseProcCgroup finds "id:controllers:path" with controller among the
// comma-separated controllers.
func parseProcCgroup(s, controller string) (string, error) {
	for _, line := range strings.Split(s, "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && slices.Contains(strings.Split(f[1], ","), controller) {
			return f[2], nil
		}
	}
	return "", fmt.Errorf("no v1 %s cgroup: %w", controller, ErrNotSupported)
}

// FreezerV1Root returns where the cgroup v1 freezer hierarchy is mounted
// (/sys/fs/cgroup/freezer on most hosts). The error wraps ErrNotSupported
// when none is mounted, and says whether the kernel has the controller.
// Mounts change, so nothing is cached.
func FreezerV1Root() (string, error) {
	ms, err := readMounts()
	if err != nil {
		return "", err
	}
	if p, ok := findMount(ms, isFreezerV1); ok {
		return p, nil
	}
	if freezerV1InKernel() {
		return "", fmt.Errorf("cgroup v1 freezer: %w: controller present (/proc/cgroups) but not mounted", ErrNotSupported)
	}
	return "", fmt.Errorf("cgroup v1 freezer: %w: no freezer controller in /proc/cgroups", ErrNotSupported)
}

// freezerV1InKernel reports whether /proc/cgroups lists an enabled freezer.
func freezerV1InKernel() bool {
	b, err := os.ReadFile("/proc/cgroups")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 4 && f[0] == "freezer" && f[3] == "1" {
			return true
		}
	}
	return false
}

// Cgroup2Root returns where the cgroup v2 (unified) hierarchy is mounted:
// /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one.
// The error wraps ErrNotSupported when none is mounted. Nothing is cached.
func Cgroup2Root() (string, error) {
	ms, err := readMounts()
	if err != nil {
		return "", err
	}
	if p, ok := findMount(ms, isCgroup2); ok {
		return p, nil
	}
	return "", fmt.Errorf("cgroup2: %w: not mounted", ErrNotSupported)
}

// HaveFreezerV2 reports whether a cgroup v2 hierarchy is mounted and can
// freeze (cgroup.freeze, Linux 5.2). The root cgroup has no cgroup.freeze,
// so the probe looks at this process's cgroup and the root's children, and
// falls back to the kernel version when both are the root or empty; it
// creates nothing.
func HaveFreezerV2() error {
	root, err := Cgroup2Root()
	if err != nil {
		return err
	}
	dirs := []string{}
	if own, err := ownCgroup2Path(); err == nil && own != "/" {
		dirs = append(dirs, filepath.Join(root, own))
	}
	if ents, err := os.ReadDir(root); err == nil {
		for _, e := range ents {
			if e.IsDir() {
				dirs = append(dirs, filepath.Join(root, e.Name()))
			}
		}
	}
	for _, d := range dirs {
		if exists(filepath.Join(d, "cgroup.freeze")) {
			return nil
		}
		// A cgroup (it has cgroup.procs) without cgroup.freeze: before 5.2.
		if exists(filepath.Join(d, "cgroup.procs")) {
			return fmt.Errorf("cgroup2 freezer: %w: no cgroup.freeze in %s", ErrNotSupported, d)
		}
	}
	v, err := RunningKernel()
	if err != nil {
		return err
	}
	if !v.AtLeast(5, 2) {
		return fmt.Errorf("cgroup2 freezer: %w: kernel %v older than 5.2", ErrNotSupported, v)
	}
	return nil
}

// ownCgroup2Path returns this process's path in the v2 hierarchy, the
// "0::PATH" line of /proc/self/cgroup.
func ownCgroup2Path() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("read /proc/self/cgroup: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("read /proc/self/cgroup: %w: no cgroup2 line", ErrNotSupported)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// CgroupRoots returns the mount point of every cgroup hierarchy, v1 and v2,
// each once (the root mount preferred over bind mounts of a subtree).
func CgroupRoots() ([]string, error) {
	ms, err := readMounts()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{} // hierarchy, by super options
	var roots []string
	for _, m := range ms {
		if m.fstype != "cgroup" && m.fstype != "cgroup2" {
			continue
		}
		key := m.fstype + ":" + strings.Join(m.superOpts, ",")
		if seen[key] {
			continue
		}
		p, ok := findMount(ms, func(o mount) bool {
			return o.fstype == m.fstype && strings.Join(o.superOpts, ",") == strings.Join(m.superOpts, ",")
		})
		if ok {
			seen[key] = true
			roots = append(roots, p)
		}
	}
	return roots, nil
}

// ControllerV1Root returns where the cgroup v1 hierarchy of controller
// (pids, memory, ...) is mounted. The error wraps ErrNotSupported when none
// is.
func ControllerV1Root(controller string) (string, error) {
	ms, err := readMounts()
	if err != nil {
		return "", err
	}
	if p, ok := findMount(ms, func(m mount) bool { return m.fstype == "cgroup" && slices.Contains(m.superOpts, controller) }); ok {
		return p, nil
	}
	return "", fmt.Errorf("cgroup v1 %s: %w: not mounted", controller, ErrNotSupported)
}

package phaul

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/images"
)

// RestorePolicy is what a destination lets a source have restored, from a
// file the operator owns (phaul serve --restore-policy). serve checks the
// CRIU options at hello and the images it received (tasks' credentials,
// capabilities and namespaces; the regular files they reopen) before CRIU
// runs; a tree it forbids is refused, and its source resumes.
type RestorePolicy struct {
	// CRIUOptions a source may ask for: tcp-established, file-locks,
	// shell-job, ext-unix-sk, ghost-limit, link-remap, manage-cgroups.
	CRIUOptions []string `json:"criu_options"`
	// HostNamespaces the tree may share with the destination (a task in
	// the namespaces its dumping CRIU ran in is restored into serve's):
	// pid, net, ipc, uts, mnt, user, cgroup, time.
	HostNamespaces []string `json:"host_namespaces"`
	// AllowRoot admits tasks with any uid or gid 0 (real, effective,
	// saved, filesystem).
	AllowRoot bool `json:"allow_root"`
	// AllowCapabilities admits tasks with any capabilities in their
	// effective or permitted sets; Capabilities names the ones admitted
	// without it (e.g. "CAP_NET_BIND_SERVICE").
	AllowCapabilities bool     `json:"allow_capabilities"`
	Capabilities      []string `json:"capabilities,omitempty"`
	// BoundingSet also holds the tasks' bounding sets to those names
	// (without allow_capabilities): no task may gain another, e.g. by
	// executing a file with capabilities. Off by default: an ordinary
	// unprivileged process has the full bounding set.
	BoundingSet bool `json:"bounding_set,omitempty"`
	// PidsMax and MemoryMaxMiB, if set, cap the restored tree: it is
	// restored into phaul/<id>-limits in the pids and memory controllers'
	// hierarchies with pids.max and the memory limit set, and stays there
	// once it runs.
	PidsMax      int64  `json:"pids_max,omitempty"`
	MemoryMaxMiB uint64 `json:"memory_max_mib,omitempty"`
	// ReadPaths and WritePaths are the path prefixes under which restored
	// tasks sharing the host's mount namespace may reopen regular files,
	// for reading only or for writing.
	ReadPaths  []string `json:"read_paths"`
	WritePaths []string `json:"write_paths"`
}

// Names of the CRIU options a policy lists.
var policyOptions = []string{"tcp-established", "file-locks", "shell-job", "ext-unix-sk", "ghost-limit", "link-remap", "manage-cgroups"}

// DefaultRestorePolicy is serve's policy without --restore-policy: trees
// of unprivileged tasks (no uid or gid 0, no capabilities), in any
// namespaces, reading files anywhere, writing only under /tmp, /var/tmp,
// /dev/shm and /dev; no CRIU option that has CRIU change the host outside
// the tree (link-remap leaves hard links beside the tree's files,
// manage-cgroups creates and writes cgroups at the tree's paths).
func DefaultRestorePolicy() RestorePolicy {
	return RestorePolicy{
		CRIUOptions:    []string{"tcp-established", "file-locks", "shell-job", "ext-unix-sk", "ghost-limit"},
		HostNamespaces: slices.Clone(images.NamespaceKinds),
		ReadPaths:      []string{"/"},
		WritePaths:     []string{"/tmp/", "/var/tmp/", "/dev/shm/", "/dev/"},
	}
}

// LoadRestorePolicy reads a policy file: owned by this user (root), not
// writable by group or others, no symlink; unknown fields are errors. A
// field the file leaves out keeps DefaultRestorePolicy's value.
func LoadRestorePolicy(path string) (RestorePolicy, error) {
	p := DefaultRestorePolicy()
	fi, err := os.Lstat(path)
	if err != nil {
		return p, fmt.Errorf("restore policy: %w", err)
	}
	st, _ := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.Mode().IsRegular():
		return p, fmt.Errorf("restore policy %s: not a regular file (a symlink?)", path)
	case st == nil || int(st.Uid) != os.Geteuid():
		return p, fmt.Errorf("restore policy %s: not owned by this user (%d)", path, os.Geteuid())
	case fi.Mode().Perm()&0o022 != 0:
		return p, fmt.Errorf("restore policy %s: mode %#o: group or others may write it", path, fi.Mode().Perm())
	case fi.Size() > 1<<20:
		return p, fmt.Errorf("restore policy %s: %d bytes", path, fi.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return p, fmt.Errorf("restore policy: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return p, fmt.Errorf("restore policy %s: %w", path, err)
	}
	return p, p.validate()
}

func (p RestorePolicy) validate() error {
	var errs []error
	for _, o := range p.CRIUOptions {
		if !slices.Contains(policyOptions, o) {
			errs = append(errs, fmt.Errorf("criu_options: %q: want one of %v", o, policyOptions))
		}
	}
	for _, ns := range p.HostNamespaces {
		if !slices.Contains(images.NamespaceKinds, ns) {
			errs = append(errs, fmt.Errorf("host_namespaces: %q: want one of %v", ns, images.NamespaceKinds))
		}
	}
	if _, err := capMask(p.Capabilities); err != nil {
		errs = append(errs, err)
	}
	if p.PidsMax < 0 {
		errs = append(errs, fmt.Errorf("pids_max %d: want a positive count (or none)", p.PidsMax))
	}
	for _, path := range append(slices.Clone(p.ReadPaths), p.WritePaths...) {
		if !filepath.IsAbs(path) {
			errs = append(errs, fmt.Errorf("paths: %q: want an absolute path", path))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("restore policy: %w", err)
	}
	return nil
}

// ErrPolicy: the restore policy forbids what the source asked for.
var ErrPolicy = errors.New("forbidden by the destination's restore policy")

// checkOptions refuses CRIU options the policy does not list.
func (p RestorePolicy) checkOptions(o criu.Options) error {
	asked := map[string]bool{"tcp-established": o.TCPEstablished, "file-locks": o.FileLocks, "shell-job": o.ShellJob,
		"ext-unix-sk": o.ExtUnixSk, "ghost-limit": o.GhostLimit != 0, "link-remap": o.LinkRemap,
		"manage-cgroups": o.ManageCgroups != "" && o.ManageCgroups != "ignore"}
	var bad []string
	for _, name := range policyOptions {
		if asked[name] && !slices.Contains(p.CRIUOptions, name) {
			bad = append(bad, "--"+name)
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%w: CRIU options %s", ErrPolicy, strings.Join(bad, ", "))
	}
	return nil
}

// checkTree refuses a tree whose images the policy forbids.
func (p RestorePolicy) checkTree(t images.TreeFacts) error {
	var errs []error
	allowed, _ := capMask(p.Capabilities) // validated at load
	hostMnt := false
	for _, task := range t.Tasks {
		if task.Zombie {
			continue // never runs again
		}
		if !p.AllowRoot && (slices.Contains(task.UIDs[:], 0) || slices.Contains(task.GIDs[:], 0)) {
			errs = append(errs, fmt.Errorf("task %d runs as uid %v gid %v (allow_root)", task.Pid, task.UIDs, task.GIDs))
		}
		if extra := (task.CapEff | task.CapPrm) &^ allowed; !p.AllowCapabilities && extra != 0 {
			errs = append(errs, fmt.Errorf("task %d has capabilities %s beyond the policy's (capabilities, allow_capabilities)",
				task.Pid, strings.Join(capNames(extra), ",")))
		}
		if extra := task.CapBnd &^ allowed; p.BoundingSet && !p.AllowCapabilities && extra != 0 {
			errs = append(errs, fmt.Errorf("task %d may gain capabilities %s: its bounding set holds them (bounding_set)",
				task.Pid, strings.Join(capNames(extra), ",")))
		}
		for _, ns := range task.HostNS {
			if !slices.Contains(p.HostNamespaces, ns) {
				errs = append(errs, fmt.Errorf("task %d shares the host's %s namespace (host_namespaces)", task.Pid, ns))
			}
			hostMnt = hostMnt || ns == "mnt"
		}
	}
	if hostMnt {
		for _, f := range t.Files {
			write := f.Flags&uint32(os.O_WRONLY|os.O_RDWR|os.O_APPEND|os.O_TRUNC|os.O_CREATE) != 0
			allowed := p.ReadPaths
			if write {
				allowed = p.WritePaths
			}
			if !underAny(f.Path, allowed) {
				mode := "reading"
				if write {
					mode = "writing"
				}
				errs = append(errs, fmt.Errorf("file %s reopened for %s (%s)", f.Path, mode, map[bool]string{true: "write_paths", false: "read_paths"}[write]))
			}
		}
	}
	if len(errs) > 0 {
		if len(errs) > 8 {
			errs = append(errs[:8], fmt.Errorf("and %d more", len(errs)-8))
		}
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		return fmt.Errorf("%w: %s", ErrPolicy, strings.Join(msgs, "; "))
	}
	return nil
}

// underAny reports whether path lies under one of the prefixes: a prefix
// ending in / holds what is below it, one without names a path and what is
// below it.
func underAny(path string, prefixes []string) bool {
	clean := filepath.Clean(path)
	if clean != path && clean+"/" != path {
		return false // "..", "//" and the like: never matched
	}
	return slices.ContainsFunc(prefixes, func(pre string) bool {
		if pre == "/" {
			return true
		}
		if strings.HasSuffix(pre, "/") {
			return strings.HasPrefix(clean, pre)
		}
		return clean == pre || strings.HasPrefix(clean, pre+"/")
	})
}

// limits are the caps the policy puts on a restored tree.
func (p RestorePolicy) limits() cgroup.Limits {
	return cgroup.Limits{PidsMax: p.PidsMax, MemoryMax: p.MemoryMaxMiB << 20}
}

// limitsGroupName is the group of id's tree in the pids and memory
// hierarchies when the policy caps it.
func limitsGroupName(id string) string { return id + "-limits" }

// capabilityNames are the kernel's capabilities, by number
// (include/uapi/linux/capability.h).
var capabilityNames = []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
	"CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
	"CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
	"CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
	"CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"}

// capMask turns capability names into a bit set.
func capMask(names []string) (uint64, error) {
	var m uint64
	for _, n := range names {
		i := slices.Index(capabilityNames, strings.ToUpper(n))
		if i < 0 {
			return 0, fmt.Errorf("capabilities: %q is no capability this build knows", n)
		}
		m |= 1 << i
	}
	return m, nil
}

// capNames names the capabilities in m (unknown bits by number); every
// capability this build knows is "every capability".
func capNames(m uint64) []string {
	if all := uint64(1)<<len(capabilityNames) - 1; m&all == all {
		out := []string{"every capability"}
		if extra := m &^ all; extra != 0 {
			out = append(out, capNames(extra)...)
		}
		return out
	}
	var out []string
	for i := range 64 {
		if m&(1<<i) == 0 {
			continue
		}
		if i < len(capabilityNames) {
			out = append(out, capabilityNames[i])
		} else {
			out = append(out, fmt.Sprintf("cap%d", i))
		}
	}
	return out
}

package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// HostsOpts shapes the src-dst link, both directions. The zero value leaves
// it unshaped.
type HostsOpts struct {
	RateBitsPerSec int64         // tbf rate; 0: unlimited
	Delay          time.Duration // netem delay each way, whole milliseconds; needs sch_netem
}

// Hosts is a set of three network namespaces standing in for the migration
// source, the destination and a client. NewHosts removes them at cleanup.
type Hosts struct {
	Prefix        string // PHAUL_NS_PREFIX given to test/hosts.sh
	Src, Dst, Cli *Netns
}

// Netns is a named network namespace, /run/netns/Name.
type Netns struct {
	Name string
	// Addr is the main address: src and dst on the migration link
	// (10.77.0.1, 10.77.0.2), cli on its link to src (10.77.1.1).
	Addr netip.Addr
	role string
}

// link mirrors the table in test/hosts.sh.
type link struct {
	a, b         string // roles
	aAddr, bAddr netip.Addr
}

var topology = [...]link{
	{"src", "dst", netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.2")},
	{"cli", "src", netip.MustParseAddr("10.77.1.1"), netip.MustParseAddr("10.77.1.2")},
	{"cli", "dst", netip.MustParseAddr("10.77.2.1"), netip.MustParseAddr("10.77.2.2")},
}

// hostsSeq makes prefixes unique within this test binary; the pid makes them
// unique between binaries.
var hostsSeq atomic.Int64

// staleName matches namespaces of NewHosts: phaul-<pid>-<seq>-<role>.
var staleName = regexp.MustCompile(`^(phaul-(\d+)-\d+)-(src|dst|cli)$`)

// exitQdiscMissing is test/hosts.sh's exit status for a kernel without a
// qdisc it needs.
const exitQdiscMissing = 3

// NewHosts creates the three namespaces under a prefix unique to this call,
// phaul-<pid>-<n>, and removes them at cleanup. It first removes namespaces
// left by test binaries that no longer run. It skips the test if the kernel
// lacks a qdisc that opts need.
func NewHosts(tb testing.TB, opts HostsOpts) *Hosts {
	tb.Helper()
	RequireRoot(tb)
	RequireCommand(tb, "ip")
	RequireCommand(tb, "nsenter")
	args := []string{"up"}
	if opts.RateBitsPerSec > 0 {
		args = append(args, "--rate", fmt.Sprintf("%dbit", opts.RateBitsPerSec))
	}
	if opts.Delay > 0 {
		args = append(args, "--delay", strconv.FormatInt(opts.Delay.Milliseconds(), 10))
	}
	if len(args) > 1 {
		RequireCommand(tb, "tc")
	}
	removeStale(tb)

	prefix := fmt.Sprintf("phaul-%d-%d", os.Getpid(), hostsSeq.Add(1))
	h := &Hosts{Prefix: prefix}
	tb.Cleanup(func() {
		if out, err := hostsScript(prefix, "down"); err != nil {
			tb.Errorf("hosts.sh down: %v\n%s", err, out)
		}
	})
	out, err := hostsScript(prefix, args...)
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == exitQdiscMissing {
		tb.Skipf("SKIP: kernel lacks a qdisc for %+v: %s", opts, bytes.TrimSpace(out))
	}
	if err != nil {
		tb.Fatalf("hosts.sh %v: %v\n%s", args, err, out)
	}
	tb.Logf("hosts %s for %s", prefix, tb.Name())
	ns := func(role string) *Netns { return &Netns{Name: prefix + "-" + role, role: role} }
	h.Src, h.Dst, h.Cli = ns("src"), ns("dst"), ns("cli")
	h.Src.Addr, h.Dst.Addr, h.Cli.Addr = h.Src.AddrTo(h.Dst), h.Dst.AddrTo(h.Src), h.Cli.AddrTo(h.Src)
	return h
}

// AddrTo returns n's address on its link to peer: the address a process in
// peer dials to reach n. It is invalid (zero) if peer is n or nil.
func (n *Netns) AddrTo(peer *Netns) netip.Addr {
	if peer == nil {
		return netip.Addr{}
	}
	for _, l := range topology {
		switch {
		case l.a == n.role && l.b == peer.role:
			return l.aAddr
		case l.b == n.role && l.a == peer.role:
			return l.bAddr
		}
	}
	return netip.Addr{}
}

// Role returns "src", "dst" or "cli".
func (n *Netns) Role() string { return n.role }

// Path returns the namespace's bind mount, for setns(2) or nsenter.
func (n *Netns) Path() string { return "/run/netns/" + n.Name }

// Command returns a command that runs name inside n, through nsenter --net
// (network namespace only; see the package doc). ctx bounds it as in
// exec.CommandContext.
func (n *Netns) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Path(), "--", name}, args...)...)
}

// Inode returns the inode number of the namespace, as /proc/PID/ns/net of a
// process inside it has (see ProcNetns).
func (n *Netns) Inode() (uint64, error) { return inode(n.Path()) }

// Contains reports whether process pid runs in n.
func (n *Netns) Contains(pid int) (bool, error) {
	want, err := n.Inode()
	if err != nil {
		return false, err
	}
	got, err := ProcNetns(pid)
	return got == want, err
}

// ProcNetns returns the inode number of the network namespace of process pid.
func ProcNetns(pid int) (uint64, error) {
	return inode(fmt.Sprintf("/proc/%d/ns/net", pid))
}

func inode(path string) (uint64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("stat %s: no inode", path)
	}
	return st.Ino, nil
}

// removeStale removes namespace sets whose test binary is gone (killed before
// its cleanup ran).
func removeStale(tb testing.TB) {
	tb.Helper()
	ents, err := os.ReadDir("/run/netns")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tb.Fatalf("list namespaces: %v", err)
	}
	done := map[string]bool{}
	for _, e := range ents {
		m := staleName.FindStringSubmatch(e.Name())
		if m == nil || done[m[1]] {
			continue
		}
		done[m[1]] = true
		if _, err := os.Stat("/proc/" + m[2]); !errors.Is(err, os.ErrNotExist) {
			continue // its binary may still run
		}
		// Not fatal: they are not this test's, and another binary may be
		// removing them now.
		out, err := hostsScript(m[1], "down")
		tb.Logf("removed stale hosts %s: %v %s", m[1], err, bytes.TrimSpace(out))
	}
}

// hostsScript runs test/hosts.sh with PHAUL_NS_PREFIX=prefix.
func hostsScript(prefix string, args ...string) ([]byte, error) {
	root, err := repoRoot()
	if err != nil {
		return nil, err
	}
	script := filepath.Join(root, "test", "hosts.sh")
	cmd := exec.Command("bash", append([]string{script}, args...)...)
	cmd.Env = append(os.Environ(), "PHAUL_NS_PREFIX="+prefix)
	return cmd.CombinedOutput()
}

package phaul

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/images"
)

func TestRestorePolicyChecks(t *testing.T) {
	p := DefaultRestorePolicy()
	if err := p.checkOptions(criu.Options{TCPEstablished: true, ShellJob: true}); err != nil {
		t.Errorf("default options refused: %v", err)
	}
	for _, o := range []criu.Options{{LinkRemap: true}, {ManageCgroups: "soft"}} {
		if err := p.checkOptions(o); !errors.Is(err, ErrPolicy) {
			t.Errorf("options %+v: %v, want ErrPolicy", o, err)
		}
	}
	if err := p.checkOptions(criu.Options{ManageCgroups: "ignore"}); err != nil {
		t.Errorf("manage-cgroups=ignore (phaul's default) refused: %v", err)
	}
	user := images.Task{Pid: 1, UIDs: [4]uint32{1000, 1000, 1000, 1000}, GIDs: [4]uint32{1000, 1000, 1000, 1000},
		HostNS: []string{"net", "mnt"}}
	ok := images.TreeFacts{Tasks: []images.Task{user}, Files: []images.OpenFile{
		{Path: "/usr/bin/sleep"}, {Path: "/tmp/log", Flags: uint32(os.O_WRONLY | os.O_APPEND)}}}
	if err := p.checkTree(ok); err != nil {
		t.Errorf("an unprivileged tree refused: %v", err)
	}
	root := user
	root.UIDs[1] = 0
	capable := user
	capable.CapEff = 1 << 21
	for name, tree := range map[string]images.TreeFacts{
		"euid 0":        {Tasks: []images.Task{root}},
		"capabilities":  {Tasks: []images.Task{capable}},
		"write /etc":    {Tasks: []images.Task{user}, Files: []images.OpenFile{{Path: "/etc/shadow", Flags: uint32(os.O_RDWR)}}},
		"dotdot escape": {Tasks: []images.Task{user}, Files: []images.OpenFile{{Path: "/tmp/../etc/passwd", Flags: uint32(os.O_WRONLY)}}},
	} {
		if err := p.checkTree(tree); !errors.Is(err, ErrPolicy) {
			t.Errorf("%s: %v, want ErrPolicy", name, err)
		}
	}
	// Capabilities by name: CAP_NET_BIND_SERVICE admitted, not more.
	named := p
	named.Capabilities = []string{"CAP_NET_BIND_SERVICE"}
	binder := user
	binder.CapEff, binder.CapPrm = 1<<10, 1<<10
	if err := named.checkTree(images.TreeFacts{Tasks: []images.Task{binder}}); err != nil {
		t.Errorf("CAP_NET_BIND_SERVICE under a policy naming it: %v", err)
	}
	binder.CapPrm |= 1 << 21
	if err := named.checkTree(images.TreeFacts{Tasks: []images.Task{binder}}); !errors.Is(err, ErrPolicy) || !strings.Contains(err.Error(), "CAP_SYS_ADMIN") {
		t.Errorf("CAP_SYS_ADMIN permitted beyond the named ones: %v, want refused naming it", err)
	}
	if got := capNames(1<<len(capabilityNames) - 1); len(got) != 1 || got[0] != "every capability" {
		t.Errorf("capNames of the full set: %v", got)
	}
	bounded := named
	bounded.BoundingSet = true
	binder.CapPrm, binder.CapBnd = 1<<10, 1<<10|1<<21
	if err := named.checkTree(images.TreeFacts{Tasks: []images.Task{binder}}); err != nil {
		t.Errorf("a full bounding set without bounding_set: %v", err)
	}
	if err := bounded.checkTree(images.TreeFacts{Tasks: []images.Task{binder}}); !errors.Is(err, ErrPolicy) || !strings.Contains(err.Error(), "CAP_SYS_ADMIN") {
		t.Errorf("CAP_SYS_ADMIN in the bounding set under bounding_set: %v, want refused naming it", err)
	}
	binder.CapBnd = 1 << 10
	if err := bounded.checkTree(images.TreeFacts{Tasks: []images.Task{binder}}); err != nil {
		t.Errorf("a bounding set within the names: %v", err)
	}
	if err := (RestorePolicy{Capabilities: []string{"CAP_FLY"}}).validate(); err == nil {
		t.Error("an unknown capability name validated")
	}
	// A zombie never runs again: its images carry no credentials.
	zombie := images.Task{Pid: 2, Zombie: true}
	if err := p.checkTree(images.TreeFacts{Tasks: []images.Task{user, zombie}}); err != nil {
		t.Errorf("a zombie in an unprivileged tree: %v", err)
	}
	noNet := p
	noNet.HostNamespaces = []string{"mnt"}
	if err := noNet.checkTree(ok); err == nil || !strings.Contains(err.Error(), "net namespace") {
		t.Errorf("a host net namespace the policy does not list: %v", err)
	}
	// In its own mount namespace the tree's paths are its own.
	own := user
	own.HostNS = []string{"net"}
	if err := p.checkTree(images.TreeFacts{Tasks: []images.Task{own},
		Files: []images.OpenFile{{Path: "/etc/x", Flags: uint32(os.O_RDWR)}}}); err != nil {
		t.Errorf("paths of a tree in its own mount namespace: %v", err)
	}
}

func TestLoadRestorePolicy(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "policy.json")
	os.WriteFile(good, []byte(`{"allow_root": true, "host_namespaces": ["net"], "criu_options": ["link-remap"]}`), 0o600)
	p, err := LoadRestorePolicy(good)
	if err != nil || !p.AllowRoot || p.CRIUOptions[0] != "link-remap" {
		t.Fatalf("load: %+v, %v", p, err)
	}
	for name, content := range map[string]string{
		"unknown field":  `{"allow_everything": true}`,
		"unknown option": `{"criu_options": ["privileged"]}`,
		"relative path":  `{"write_paths": ["tmp"]}`,
	} {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		os.WriteFile(path, []byte(content), 0o600)
		if _, err := LoadRestorePolicy(path); err == nil {
			t.Errorf("%s: loaded", name)
		}
	}
	open := filepath.Join(dir, "open.json")
	os.WriteFile(open, []byte(`{}`), 0o600)
	os.Chmod(open, 0o666)
	if _, err := LoadRestorePolicy(open); err == nil {
		t.Error("a policy others may write: loaded")
	}
	link := filepath.Join(dir, "link.json")
	os.Symlink(good, link)
	if _, err := LoadRestorePolicy(link); err == nil {
		t.Error("a symlinked policy: loaded")
	}
}

// TestRegisterCaps: one source cannot take every migration slot, and
// migrations left in doubt cap new ones (issue 12, finding 5).
func TestRegisterCaps(t *testing.T) {
	cfg := DefaultServeConfig()
	cfg.MaxMigrations, cfg.MaxMigrationsPerPeer, cfg.MaxInDoubt = 8, 2, 1
	s := &Server{cfg: cfg, active: map[string]*incoming{}, inDoubt: map[string]int{}}
	for _, id := range []string{"a", "b"} {
		if err := s.register(&incoming{id: id}); err != nil {
			t.Fatalf("register %s: %v", id, err)
		}
	}
	if err := s.register(&incoming{id: "c"}); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "this source") {
		t.Fatalf("a third migration of one source: %v, want ErrBusy per peer", err)
	}
	delete(s.active, "a")
	s.inDoubt["z"] = 42
	if err := s.register(&incoming{id: "c"}); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "in doubt") {
		t.Fatalf("with one migration in doubt: %v, want ErrBusy in doubt", err)
	}
	delete(s.inDoubt, "z")
	if err := s.register(&incoming{id: "c"}); err != nil {
		t.Fatalf("once resolved: %v", err)
	}
}

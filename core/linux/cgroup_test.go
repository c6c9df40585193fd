package linux

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const hybridMountinfo = `22 1 0:21 / /proc rw,nosuid - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`

func TestParseMountinfo(t *testing.T) {
	tests := []struct {
		name       string
		in         string
		freezer    string
		cgroup2    string
		wantErr    bool
		wantMounts int
	}{
		{"hybrid", hybridMountinfo, "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified", false, 5},
		{"pure v2", "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n", "", "/sys/fs/cgroup", false, 1},
		{"co-mounted v1 and optional fields", "40 31 0:34 / /sys/fs/cgroup/cpu,freezer rw shared:9 master:2 - cgroup cgroup rw,cpu,freezer\n", "/sys/fs/cgroup/cpu,freezer", "", false, 1},
		{"bind of a subtree comes second", "50 1 0:38 /docker/abc /mnt/sub rw - cgroup2 cgroup2 rw\n51 1 0:38 / /mnt/all rw - cgroup2 cgroup2 rw\n", "", "/mnt/all", false, 2},
		{"only a subtree", "50 1 0:38 /docker/abc /mnt/sub rw - cgroup2 cgroup2 rw\n", "", "/mnt/sub", false, 1},
		{"escaped space", `60 1 0:38 / /mnt/my\040cg rw - cgroup2 none rw` + "\n", "", "/mnt/my cg", false, 1},
		{"named v1 is not the freezer", "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n", "", "", false, 1},
		{"no separator", "1 2 3:4 / /x rw\n", "", "", true, 0},
		{"empty", "", "", "", false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ms, err := parseMountinfo(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr || len(ms) != tt.wantMounts {
				t.Fatalf("parseMountinfo = %d mounts, %v", len(ms), err)
			}
			if got, _ := findMount(ms, isFreezerV1); got != tt.freezer {
				t.Errorf("freezer v1 at %q, want %q", got, tt.freezer)
			}
			if got, _ := findMount(ms, isCgroup2); got != tt.cgroup2 {
				t.Errorf("cgroup2 at %q, want %q", got, tt.cgroup2)
			}
		})
	}
}

func TestCgroupRootsOnThisHost(t *testing.T) {
	v1, err := FreezerV1Root()
	t.Logf("freezer v1: %q, %v", v1, err)
	switch {
	case err == nil:
		if _, serr := os.Stat(filepath.Join(v1, "cgroup.procs")); serr != nil {
			t.Errorf("freezer root %s is no cgroup: %v", v1, serr)
		}
		if notBuilt(t, "CONFIG_CGROUP_FREEZER") {
			t.Errorf("freezer v1 at %s, but the kernel is built without CONFIG_CGROUP_FREEZER", v1)
		}
	case !errors.Is(err, ErrNotSupported):
		t.Errorf("FreezerV1Root: %v", err)
	case notBuilt(t, "CONFIG_CGROUP_FREEZER") && strings.Contains(err.Error(), "present"):
		t.Errorf("no CONFIG_CGROUP_FREEZER, yet %v", err)
	}

	v2, err := Cgroup2Root()
	t.Logf("cgroup2: %q, %v", v2, err)
	if err != nil {
		checkConclusive(t, "cgroup2", err, true)
		checkConclusive(t, "cgroup2 freezer", HaveFreezerV2(), true)
		return
	}
	if _, serr := os.Stat(filepath.Join(v2, "cgroup.controllers")); serr != nil {
		t.Errorf("cgroup2 root %s lacks cgroup.controllers: %v", v2, serr)
	}
	// cgroup.freeze came in 5.2: before it the probe must say no; after
	// it, whatever it finds.
	checkConclusive(t, "cgroup2 freezer", HaveFreezerV2(), olderThan(t, 5, 2))
}

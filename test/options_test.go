package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/test/testenv"
)

// TestCRIUOptions migrates workloads that hold state CRIU refuses to dump
// without an option: without the option the migration fails and the
// workload keeps running on the source; with it the workload moves and its
// own checks of that state keep passing.
func TestCRIUOptions(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	tests := []struct {
		name    string
		opts    testenv.WorkloadOpts
		flags   []string
		sink    bool   // an external unix socket the workload sends to
		wantErr string // without flags
		// sharedFS says why the move itself cannot work on test hosts that
		// share one filesystem and one kernel (the positive half is then
		// skipped, loudly).
		sharedFS string
	}{
		{name: "tcp-established", opts: testenv.WorkloadOpts{TCPPair: true}, flags: []string{"--tcp-established"},
			wantErr: "--tcp-established"},
		{name: "ext-unix-sk", flags: []string{"--ext-unix-sk"}, sink: true, wantErr: "--ext-unix-sk"},
		{name: "ghost-limit", opts: testenv.WorkloadOpts{Ghost: true, GhostKiB: 2048}, flags: []string{"--ghost-limit", "4M"},
			wantErr: "increase limit"},
		{name: "link-remap", opts: testenv.WorkloadOpts{GhostLink: true}, flags: []string{"--link-remap"},
			wantErr: "link"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ee := *e
			ee.t = t
			opts := tt.opts
			opts.MiB, opts.PagesPerSec = 16, 500
			var sink *testenv.UnixSink
			if tt.sink {
				sink = testenv.StartUnixSink(t, e.hosts.Src)
				opts.ExtUnix = sink.Path
			}
			w := testenv.StartWorkload(t, e.hosts.Src, opts)
			w.WaitProgress(t, 3)

			r := ee.migrate(w.PID())
			if r.code == 0 {
				t.Fatalf("migrated without %v; CRIU should have refused", tt.flags)
			}
			if !strings.Contains(lastLine(r.out), tt.wantErr) {
				t.Fatalf("error %q does not say %q\n%s", lastLine(r.out), tt.wantErr, r.out)
			}
			t.Logf("without %v: %s", tt.flags, lastLine(r.out))
			ee.assertOnSource(w)
			ee.assertNoImagesLeft()
			assertNoCgroup(t, r)

			if tt.sharedFS != "" {
				t.Skipf("SKIP the move with %v on these test hosts: %s", tt.flags, tt.sharedFS)
			}
			r = ee.migrate(w.PID(), tt.flags...)
			ee.assertMigrated(w, r)
			if sink != nil {
				// The moved workload still reaches the socket outside it.
				before, err := sink.Ticks()
				if err != nil {
					t.Fatal(err)
				}
				testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
					now, err := sink.Ticks()
					return len(now) >= len(before)+3, err
				})
			}
		})
	}
}

// TestFileLocks moves a workload holding a flock. The lock file lives in a
// directory each host has its own copy of (the destination's is a tmpfs in
// its own mount namespace): on one shared filesystem the frozen source would
// still hold the very lock the restore must take, which no two real hosts
// share.
func TestFileLocks(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.dstOwnDir = filepath.Join(e.dir, "host-local")
	if err := os.Mkdir(e.dstOwnDir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500, Flock: true, FlockDir: e.dstOwnDir})
	w.WaitProgress(t, 3)

	r := e.migrate(w.PID())
	if r.code == 0 || !strings.Contains(lastLine(r.out), "--file-locks") {
		t.Fatalf("without --file-locks: exit %d, %q; want CRIU's refusal naming the flag\n%s", r.code, lastLine(r.out), r.out)
	}
	e.assertOnSource(w)
	e.assertNoImagesLeft()

	r = e.migrate(w.PID(), "--file-locks")
	pid := e.assertMigrated(w, r)
	// The moved workload holds the lock on the destination's file: its own
	// check (it logs "ok flock" rounds and FAILs when it lost the lock)
	// keeps passing, and the restored copy has the destination's file open.
	locks, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(locks), fmt.Sprintf("FLOCK  ADVISORY  WRITE %d ", pid)) {
		t.Fatalf("restored copy %d holds no flock:\n%s", pid, locks)
	}
	w.WaitProgress(t, 5)
	w.CheckHealthy(t)
}

// TestShellJob moves a workload whose session leader (the test) is outside
// the tree, as a job started from a shell is. CRIU refuses a session leader
// outside the tree's PID namespace even with --shell-job, so this workload
// runs in the host's PID namespace; the destination gets a PID namespace of
// its own, as a second kernel would, so the restore does not clash with the
// pids its frozen source still holds.
func TestShellJob(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.dstOwnPIDNS = true
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500, InSession: true, HostPIDNS: true})
	w.WaitProgress(t, 3)

	r := e.migrate(w.PID())
	if r.code == 0 || !strings.Contains(lastLine(r.out), "shell-job") {
		t.Fatalf("without --shell-job: exit %d, %q; want CRIU's refusal naming the flag\n%s", r.code, lastLine(r.out), r.out)
	}
	e.assertOnSource(w)
	e.assertNoImagesLeft()

	r = e.migrate(w.PID(), "--shell-job")
	pid := e.assertMigrated(w, r)
	if ns := nsPids(t, pid); len(ns) != 2 {
		t.Fatalf("restored copy %d: NSpid %v, want it in the destination's PID namespace", pid, ns)
	}
}

// TestRestoreFailureResumesSource makes the destination's restore fail
// (CRIU is killed by --restore-timeout while it restores): the destination
// must kill the half-restored tree and abort, the source must resume its
// workload, and both ends must be clean.
func TestRestoreFailureResumesSource(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe("--restore-timeout", "30ms")
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500})
	r := e.migrate(w.PID())
	if r.code == 0 {
		t.Fatalf("migrated although the destination's restore must fail\n%s", r.out)
	}
	if !strings.Contains(lastLine(r.out), "restore") {
		t.Fatalf("error %q does not name the restore\n%s", lastLine(r.out), r.out)
	}
	e.assertOnSource(w)
	e.assertNoImagesLeft()
	assertNoCgroup(t, r)
	if !strings.Contains(e.readServeLog(), "migration failed") {
		t.Errorf("serve log does not report the failure:\n%s", e.readServeLog())
	}
}

// TestManageCgroups moves a workload that lives in cgroups of the test's
// own. Ignored (phaul's default), the restored tree lives under the
// destination's cgroup parent; managed (soft, or --manage-cgroups bare as
// CRIU takes it), CRIU puts it back in its own cgroups, an exclusive
// cpuset included, which restores only where its parent is exclusive too:
// under a per-migration group it could not.
func TestManageCgroups(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	for _, tt := range []struct {
		name      string
		flags     []string
		exclusive bool // the workload's cpuset is cpu_exclusive
		wantOwn   bool // restored into the workload's own cgroups
	}{
		{"ignore", nil, false, false},
		{"soft", []string{"--manage-cgroups", "soft"}, false, true},
		{"bare", []string{"--manage-cgroups"}, false, true},
		{"exclusive cpuset", []string{"--manage-cgroups"}, true, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ee := *e
			ee.t = t
			w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500})
			own := fmt.Sprintf("phaul-test-%d", w.PID())
			roots, err := linux.CgroupRoots()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range roots {
				dir := filepath.Join(r, own)
				if err := os.Mkdir(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					g := &cgroup.Group{Name: own, Paths: []string{dir}}
					g.Kill(5 * time.Second) // the restored copy lives here
					if err := removeCgroupDir(dir); err != nil {
						t.Errorf("remove test cgroup: %v", err)
					}
				})
				for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
					if v, err := os.ReadFile(filepath.Join(r, f)); err == nil {
						os.WriteFile(filepath.Join(dir, f), v, 0)
					}
				}
				if _, err := os.Stat(filepath.Join(dir, "cpuset.cpu_exclusive")); err == nil && tt.exclusive {
					if err := os.WriteFile(filepath.Join(dir, "cpuset.cpu_exclusive"), []byte("1"), 0); err != nil {
						t.Skipf("SKIP: cannot make an exclusive cpuset here (another cpuset on this host shares its CPUs): %v", err)
					}
				}
				if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(w.PID())), 0); err != nil {
					t.Fatalf("move workload into %s: %v", dir, err)
				}
			}
			if got := procCgroup(t, w.PID(), "pids"); got != "/"+own {
				t.Fatalf("workload in pids cgroup %q, want /%s", got, own)
			}
			r := ee.migrate(w.PID(), tt.flags...)
			pid := ee.assertMigrated(w, r)
			for _, h := range []string{"pids", "freezer", "cpuset"} {
				got := procCgroup(t, pid, h)
				switch {
				case tt.wantOwn && got != "/"+own:
					t.Fatalf("restored copy in %s cgroup %q, want its own /%s", h, got, own)
				case !tt.wantOwn && got == "/"+own:
					t.Fatalf("restored copy in %s cgroup %q: ignored cgroups, yet its own", h, got)
				}
			}
			if !tt.wantOwn && procCgroup(t, pid, "freezer") != e.cgParent {
				t.Fatalf("restored copy in freezer cgroup %q, want the destination's parent %q", procCgroup(t, pid, "freezer"), e.cgParent)
			}
			if tt.exclusive {
				b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/cpuset", own, "cpuset.cpu_exclusive"))
				if err != nil || strings.TrimSpace(string(b)) != "1" {
					t.Fatalf("cpuset %s after the move: cpu_exclusive %q, %v", own, b, err)
				}
			}
		})
	}
}

package test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/test/testenv"
)

// TestServeBadInput starts phaul serve with what it must refuse: each must
// exit non-zero at once with a one-line error.
func TestServeBadInput(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	withKey := e.tlsDirWithCAKey("x")
	notDir := filepath.Join(e.dir, "not-a-dir")
	os.WriteFile(notDir, nil, 0o600)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"tls dir holds ca.key", []string{"--listen", "127.0.0.1:0", "--work-dir", e.dstWork, "--tls-dir", withKey}, "ca.key"},
		{"tls dir missing", []string{"--listen", "127.0.0.1:0", "--work-dir", e.dstWork, "--tls-dir", filepath.Join(e.dir, "none")}, "tls"},
		{"work dir not writable", []string{"--listen", "127.0.0.1:0", "--work-dir", filepath.Join(notDir, "sub"), "--tls-dir", e.dstTLS}, "work dir"},
		{"bad listen address", []string{"--listen", "no-port", "--work-dir", e.dstWork, "--tls-dir", e.dstTLS}, "listen"},
		{"criu missing", []string{"--criu", "/nonexistent/criu", "--listen", "127.0.0.1:0", "--work-dir", e.dstWork, "--tls-dir", e.dstTLS}, "criu"},
		{"source-only cert", []string{"--listen", "127.0.0.1:0", "--work-dir", e.dstWork, "--tls-dir", e.srcTLS}, "source only"},
		{"deny list missing", []string{"--listen", "127.0.0.1:0", "--work-dir", e.dstWork, "--tls-dir", e.dstTLS, "--deny-list", filepath.Join(e.dir, "none")}, "deny list"},
	}
	// Every case names its peers but one: serve refuses to start without.
	for i := range tests {
		tests[i].args = append(tests[i].args, "--allow-peer", "nodea.example")
	}
	tests = append(tests, struct {
		name string
		args []string
		want string
	}{"no peer allowed", []string{"--listen", "127.0.0.1:0", "--work-dir", e.dstWork, "--tls-dir", e.dstTLS}, "--allow-peer"})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, e.bin, append([]string{"serve"}, tt.args...)...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("serve: %v, want a non-zero exit\n%s", err, out)
			}
			last := lastLine(string(out))
			t.Logf("exit %d: %s", ee.ExitCode(), last)
			if !strings.HasPrefix(last, "phaul: ") || !strings.Contains(last, tt.want) {
				t.Fatalf("error line %q does not say %q", last, tt.want)
			}
		})
	}
}

// TestConcurrentMigrations moves two workloads to one destination at the
// same time: each lands in its own directory and cgroup, and each is
// verified as a single migration is.
func TestConcurrentMigrations(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	ws := []*testenv.Workload{
		testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, PagesPerSec: 1000}),
		testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, PagesPerSec: 1000}),
	}
	results := make([]result, len(ws))
	var wg sync.WaitGroup
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = e.migrateQuiet(w.PID())
		}()
	}
	wg.Wait()
	ids := map[string]bool{}
	for i, w := range ws {
		t.Logf("migration %d: exit %d, %s", i, results[i].code, lastLine(results[i].out))
		e.assertMigrated(w, results[i])
		ids[results[i].str("migration_id")] = true
	}
	if len(ids) != len(ws) {
		t.Fatalf("migration ids %v: want %d distinct", ids, len(ws))
	}
	if !strings.Contains(e.readServeLog(), fmt.Sprintf("migration=%s", results[1].str("migration_id"))) {
		t.Fatalf("serve log does not mention the second migration")
	}
}

// TestSilentSessionDropped: an authenticated source that opens no stream
// is dropped after --hello-timeout (issue 12: such a session held its
// connection and a goroutine for ever); the negative control is the
// session staying up while the timeout has not passed.
func TestSilentSessionDropped(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe("--hello-timeout", "2s")
	sess := e.dialDest()
	defer sess.Close()
	select {
	case <-sess.Done():
		t.Fatal("dropped before the hello timeout")
	case <-time.After(time.Second):
	}
	select {
	case <-sess.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("a session that opened no stream is still up 20s after a 2s hello timeout")
	}
	waitServeLog(t, e, regexp.MustCompile(`no control stream`), 10*time.Second, nil)
}

// TestSessionsPerPeer: a source holding --max-sessions-per-peer idle
// sessions gets its next one closed at once (the held ones stay until the
// hello timeout); once they are closed it migrates as usual.
func TestSessionsPerPeer(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe("--max-sessions-per-peer", "2", "--hello-timeout", "30s")
	held := []*transport.Session{e.dialDest(), e.dialDest()}
	third := e.dialDest()
	select {
	case <-third.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("a third session of the same source is still up under --max-sessions-per-peer 2")
	}
	for _, s := range held {
		select {
		case <-s.Done():
			t.Fatal("a session within the bound was dropped")
		default:
		}
	}
	waitServeLog(t, e, regexp.MustCompile(`too many sessions of this source`), 10*time.Second, nil)
	for _, s := range held {
		s.Close()
	}
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500})
	w.WaitProgress(t, 3)
	// The service has let them go once it logs both ends.
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		return strings.Count(e.readServeLog(), "no control stream") >= 2, nil
	})
	e.assertMigrated(w, e.migrate(w.PID()))
}

// TestRestorePolicy: under serve's default restore policy a source asking
// for a CRIU option that changes the host (--link-remap) is refused at
// hello, and a tree of root tasks (the test workload) is refused once its
// images arrive, before CRIU runs; both times the workload runs on at the
// source, and nothing is left on the destination. The negative control is
// every other test: the same workload migrates under a policy that allows
// root (permissivePolicy).
func TestRestorePolicy(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe("--restore-policy", "") // the default policy
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500})
	w.WaitProgress(t, 3)

	r := e.migrate(w.PID(), "--link-remap")
	if r.code != 1 || !strings.Contains(lastLine(r.out), "restore policy") || !strings.Contains(lastLine(r.out), "link-remap") {
		t.Fatalf("--link-remap under the default policy: exit %d, %q; want refused by the restore policy", r.code, lastLine(r.out))
	}
	e.assertOnSource(w)

	r = e.migrate(w.PID())
	if r.code != 1 || !strings.Contains(r.out, "restore policy") || !strings.Contains(r.out, "allow_root") {
		t.Fatalf("a root tree under the default policy: exit %d, want refused (allow_root)\n%s", r.code, r.out)
	}
	e.assertOnSource(w)
	log := e.readServeLog()
	if !strings.Contains(log, "restore refused") {
		t.Fatalf("serve did not log the refusal\n%s", log)
	}
	if strings.Contains(log, "script=pre-restore") || strings.Contains(log, `msg="lazy restore"`) {
		t.Fatalf("CRIU's restore ran for a tree the policy refused\n%s", log)
	}
	waitDirEmpty(t, e.dstWork, 30*time.Second)
	w.CheckHealthy(t)
}

// TestMaxMigrationTime: a migration whose rounds and transfer outlast the
// service's --max-migration-time is aborted there, however often its
// source pings, and the source's copy runs on.
func TestMaxMigrationTime(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 50e6})
	e.startServe("--max-migration-time", "3s")
	// 64 MiB over 6 MB/s takes ~11 s for round 1 alone.
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 64, PagesPerSec: 1000})
	w.WaitProgress(t, 3)
	t0 := time.Now()
	r := e.migrate(w.PID(), "--mode", "precopy", "--max-rounds", "100")
	took := time.Since(t0)
	if r.code == 0 || !strings.Contains(r.out, "max-migration-time") {
		t.Fatalf("migration under a 3s limit: exit %d after %v; want aborted naming --max-migration-time\n%s", r.code, took, r.out)
	}
	if took > 30*time.Second {
		t.Fatalf("the abort took %v after a 3s limit", took)
	}
	e.assertOnSource(w)
	waitDirEmpty(t, e.dstWork, 30*time.Second)
	w.CheckHealthy(t)
}

// TestDiskBudget: a service refuses a migration when its filesystem is
// below --min-free-disk, and aborts one whose directory outgrows
// --disk-budget-mib while it receives; the source's copy runs on and the
// destination keeps nothing.
func TestDiskBudget(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{RateBitsPerSec: 200e6})
	e.startServe("--min-free-disk-mib", "1000000000") // a petabyte free: never
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 64, PagesPerSec: 500})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID())
	if r.code == 0 || !strings.Contains(r.out, "min-free-disk") {
		t.Fatalf("migration to a service short of disk: exit %d; want refused naming --min-free-disk\n%s", r.code, r.out)
	}
	e.assertOnSource(w)

	e.stopServe()
	e.startServe("--disk-budget-mib", "16")
	r = e.migrate(w.PID(), "--mode", "cold")
	if r.code == 0 || !strings.Contains(r.out, "disk budget") {
		t.Fatalf("64 MiB into a 16 MiB disk budget: exit %d; want aborted naming the disk budget\n%s", r.code, r.out)
	}
	e.assertOnSource(w)
	waitDirEmpty(t, e.dstWork, 30*time.Second)
	w.CheckHealthy(t)
}

// TestRestoreLimits: a policy with pids_max and memory_max_mib restores
// the tree into phaul/<id>-limits of the pids and memory controllers,
// where it stays once it runs, capped; the workload verifies itself there.
func TestRestoreLimits(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	policy := filepath.Join(e.dir, "limits-policy.json")
	b, err := os.ReadFile(e.permissivePolicy())
	if err != nil {
		t.Fatal(err)
	}
	capped := strings.Replace(string(b), `"allow_root": true`, `"pids_max": 16, "memory_max_mib": 512, "allow_root": true`, 1)
	if err := os.WriteFile(policy, []byte(capped), 0o600); err != nil {
		t.Fatal(err)
	}
	e.startServe("--restore-policy", policy)
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, PagesPerSec: 500, Children: 2})
	w.WaitProgress(t, 3)
	r := e.migrate(w.PID())
	root := e.assertMigrated(w, r)
	id := r.str("migration_id")
	// The group outlives the test's workload: the host is left as found.
	t.Cleanup(func() { removeCgroup(t, id+"-limits") })
	limited := map[string]string{"pids": "pids.max", "memory": "memory.limit_in_bytes"}
	want := map[string]string{"pids": "16", "memory": fmt.Sprint(512 << 20)}
	found := 0
	for ctl, file := range limited {
		dir := filepath.Join("/sys/fs/cgroup", ctl, "phaul", id+"-limits")
		if _, err := os.Stat(dir); err != nil {
			continue // not a v1 hierarchy here
		}
		found++
		got, _ := os.ReadFile(filepath.Join(dir, file))
		if strings.TrimSpace(string(got)) != want[ctl] {
			t.Errorf("%s/%s = %q, want %s", dir, file, got, want[ctl])
		}
		procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if len(strings.Fields(string(procs))) != 3 || !strings.Contains(string(procs), fmt.Sprint(root)) {
			t.Errorf("%s holds %q, want the restored root %d and its 2 children", dir, procs, root)
		}
	}
	if found == 0 {
		t.Skip("SKIP: no v1 pids or memory hierarchy on this host to look into")
	}
	w.CheckHealthy(t)
}

// dialDest opens an authenticated session to the service from the source
// host, with the source's identity, and opens no stream.
func (e *env) dialDest() *transport.Session {
	e.t.Helper()
	id, err := transport.LoadTLS(e.srcTLS)
	if err != nil {
		e.t.Fatal(err)
	}
	cfg := transport.DefaultConfig()
	cfg.Identity = id
	var sess *transport.Session
	err = linux.InNetns(e.srcAnchor(), func() (err error) {
		sess, err = transport.Dial(context.Background(), e.destAddr(), cfg)
		return err
	})
	if err != nil {
		e.t.Fatalf("%v\nserve log:\n%s", err, e.readServeLog())
	}
	return sess
}

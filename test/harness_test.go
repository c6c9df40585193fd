package test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/phaul"
	"github.com/phaul/phaul/test/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// servePort is where phaul serve listens inside the destination namespace.
const servePort = 7000

var buildPhaul = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "phaul-e2e-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "phaul")
	out, err := exec.Command("go", "build", "-tags", "phaulfaults", "-o", bin, "github.com/phaul/phaul/cmd/phaul").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build phaul: %v\n%s", err, out)
	}
	return bin, nil
})

// env is two test hosts with certificates, a destination service and the
// phaul binary.
type env struct {
	t         testing.TB
	bin       string
	hosts     *testenv.Hosts
	dir       string
	srcTLS    string
	dstTLS    string
	srcWork   string
	dstWork   string
	serve     *exec.Cmd
	serveLog  string
	serveDone chan struct{}
	// dstOwnDir, if set, is a directory the destination does not share
	// with the source; dstOwnPIDNS gives the destination a PID namespace
	// of its own (see startServeAt).
	dstOwnDir   string
	dstOwnPIDNS bool
	// cgParent is the destination's --cgroup-parent, a cgroup this test
	// made in the freezer v1 and cgroup v2 hierarchies.
	cgParent string
}

func newEnv(t testing.TB, opts testenv.HostsOpts) *env {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireCRIU(t)
	bin, err := buildPhaul()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, bin: bin, hosts: testenv.NewHosts(t, opts), dir: t.TempDir()}
	e.cgParent = testCgroup(t, fmt.Sprintf("phaul-test-%d-%s", os.Getpid(), filepath.Base(e.dir)))
	e.srcTLS = filepath.Join(e.dir, "tls-src")
	e.dstTLS = filepath.Join(e.dir, "tls-dst")
	e.srcWork = filepath.Join(e.dir, "work-src")
	e.dstWork = filepath.Join(e.dir, "work-dst")
	ca := filepath.Join(e.dir, "ca")
	e.run(nil, "certs", "--ca-dir", ca, "--out", e.srcTLS, "--host", e.hosts.Src.Addr.String(), "--role", "source")
	e.run(nil, "certs", "--ca-dir", ca, "--out", e.dstTLS, "--host", e.hosts.Dst.Addr.String(), "--role", "destination")
	return e
}

// run runs phaul with args (in ns if set) and fails the test on error.
func (e *env) run(ns *testenv.Netns, args ...string) string {
	e.t.Helper()
	out, code := e.phaul(ns, args...)
	if code != 0 {
		e.t.Fatalf("phaul %v: exit %d\n%s", args, code, out)
	}
	return out
}

// phaul runs phaul with args (in ns if set) and returns its combined output
// and exit status.
func (e *env) phaul(ns *testenv.Netns, args ...string) (string, int) {
	e.t.Helper()
	out, code := e.phaulQuiet(ns, args...)
	if code < 0 {
		e.t.Fatalf("phaul %v: %s", args, out)
	}
	return out, code
}

// phaulQuiet is phaul without failing the test; a run that could not
// start returns code -1 and the error as output. Safe from any goroutine.
func (e *env) phaulQuiet(ns *testenv.Netns, args ...string) (string, int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var cmd *exec.Cmd
	if ns != nil {
		cmd = ns.Command(ctx, e.bin, args...)
	} else {
		cmd = exec.CommandContext(ctx, e.bin, args...)
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	default:
		return fmt.Sprintf("%v\n%s", err, out), -1
	}
}

// phaulShell runs script with sh in the source namespace.
func (e *env) phaulShell(script string) (string, int) {
	e.t.Helper()
	out, err := e.hosts.Src.Command(context.Background(), "sh", "-c", script).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		e.t.Fatalf("sh -c %q: %v", script, err)
	}
	return string(out), 0
}

func (e *env) destAddr() string {
	return fmt.Sprintf("%s:%d", e.hosts.Dst.Addr, servePort)
}

// startServe runs phaul serve in the destination namespace until cleanup,
// which stops it with SIGTERM and checks that it exits 0.
func (e *env) startServe(extra ...string) {
	e.t.Helper()
	e.serveLog = filepath.Join(e.dir, "serve.log")
	e.startServeAt(e.destAddr(), extra...)
}

// srcAnchor starts a process in the source namespace and returns its pid
// once it is inside (nsenter joins after the process exists): tests read
// the namespace's nftables or dial from it through that pid, and traffic
// to the test hosts' addresses must never leave from the host's own. It
// is killed at cleanup.
func (e *env) srcAnchor() int {
	e.t.Helper()
	anchor := e.hosts.Src.Command(context.Background(), "sleep", "600")
	if err := anchor.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { anchor.Process.Kill(); anchor.Wait() })
	testenv.WaitFor(e.t, 10*time.Second, func() (bool, error) { return e.hosts.Src.Contains(anchor.Process.Pid) })
	return anchor.Process.Pid
}

// permissivePolicy writes (once) a restore policy that lets the tests'
// workloads through: they run as root, with every capability, and use
// every CRIU option phaul carries. TestRestorePolicy checks the default.
func (e *env) permissivePolicy() string {
	path := filepath.Join(e.dir, "restore-policy.json")
	if _, err := os.Stat(path); err == nil {
		return path
	}
	policy := `{"criu_options": ["tcp-established", "file-locks", "shell-job", "ext-unix-sk", "ghost-limit", "link-remap", "manage-cgroups"],
 "host_namespaces": ["pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time"],
 "allow_root": true, "allow_capabilities": true, "read_paths": ["/"], "write_paths": ["/"]}`
	if err := os.WriteFile(path, []byte(policy), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return path
}

// startServeAt runs phaul serve on addr, logging to e.serveLog.
func (e *env) startServeAt(addr string, extra ...string) {
	e.t.Helper()
	logf, err := os.Create(e.serveLog)
	if err != nil {
		e.t.Fatal(err)
	}
	defer logf.Close()
	args := append([]string{"--log-level", "debug", "serve", "--listen", addr,
		"--work-dir", e.dstWork, "--tls-dir", e.dstTLS, "--cgroup-parent", e.cgParent,
		"--allow-peer", e.hosts.Src.Addr.String(), "--restore-policy", e.permissivePolicy()}, extra...)
	e.serve = e.hosts.Dst.Command(context.Background(), e.bin, args...)
	if e.dstOwnDir != "" || e.dstOwnPIDNS {
		// The destination host gets a mount namespace of its own, with a
		// tmpfs at dstOwnDir holding an empty workload.lock as a freshly
		// provisioned host would, and with dstOwnPIDNS a PID namespace of
		// its own (phaul serve is its init). Restored trees live there too.
		flags := []string{"--mount", "--propagation", "private"}
		if e.dstOwnPIDNS {
			flags = append(flags, "--pid", "--fork", "--mount-proc")
		}
		script := `exec "$@"`
		if e.dstOwnDir != "" {
			script = `mount -t tmpfs phaul-dst "$0" && : > "$0/workload.lock" && exec "$@"`
		}
		e.serve = e.hosts.Dst.Command(context.Background(), "unshare",
			append(append(flags, "sh", "-c", script, e.dstOwnDir, e.bin), args...)...)
	}
	e.serve.Stdout, e.serve.Stderr = logf, logf
	if err := e.serve.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.serveDone = make(chan struct{})
	go func() { // owned by e; cleanup waits for it
		e.serve.Wait()
		close(e.serveDone)
	}()
	e.t.Cleanup(e.stopServe)
	testenv.WaitFor(e.t, 30*time.Second, func() (bool, error) {
		select {
		case <-e.serveDone:
			return false, fmt.Errorf("serve exited: %v\n%s", e.serve.ProcessState, e.readServeLog())
		default:
		}
		return strings.Contains(e.readServeLog(), "msg=serving"), nil
	})
}

func (e *env) readServeLog() string {
	b, _ := os.ReadFile(e.serveLog)
	return string(b)
}

func (e *env) stopServe() {
	if e.serve == nil || e.serve.Process == nil {
		return
	}
	select {
	case <-e.serveDone:
		return
	default:
	}
	target := e.serve.Process.Pid
	if e.dstOwnPIDNS {
		// unshare --fork waits for phaul serve, its child, and does not
		// pass signals on: signal phaul itself.
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", target, target))
		if f := strings.Fields(string(b)); err == nil && len(f) == 1 {
			target, _ = strconv.Atoi(f[0])
		}
	}
	syscall.Kill(target, syscall.SIGTERM)
	select {
	case <-e.serveDone:
		if code := e.serve.ProcessState.ExitCode(); code != 0 {
			e.t.Errorf("serve exited %d after SIGTERM\n%s", code, e.readServeLog())
		}
	case <-time.After(90 * time.Second):
		e.serve.Process.Kill()
		<-e.serveDone
		e.t.Errorf("serve ignored SIGTERM for 90s\n%s", e.readServeLog())
	}
}

// result is one phaul migrate run.
type result struct {
	out   string
	code  int
	stats map[string]any
	flags []string // the migrate flags the test added
}

// managedCgroups reports whether the migration asked CRIU to manage
// cgroups (any mode but ignore).
func (r result) managedCgroups() bool {
	for i, f := range r.flags {
		if v, ok := strings.CutPrefix(f, "--manage-cgroups"); ok {
			if v == "" && i+1 < len(r.flags) {
				v = "=" + r.flags[i+1]
			}
			return v != "=ignore"
		}
	}
	return false
}

func (r result) str(key string) string {
	s, _ := r.stats[key].(string)
	return s
}

func (r result) num(key string) float64 {
	f, _ := r.stats[key].(float64)
	return f
}

// migrate runs phaul migrate in the source namespace.
func (e *env) migrate(pid int, extra ...string) result {
	e.t.Helper()
	r := e.migrateQuiet(pid, extra...)
	e.t.Logf("phaul migrate exit %d\n%s", r.code, r.out)
	return r
}

// migrateQuiet is migrate without logging; safe to call from several
// goroutines.
func (e *env) migrateQuiet(pid int, extra ...string) result {
	statsPath := filepath.Join(e.dir, fmt.Sprintf("stats-%d.json", time.Now().UnixNano()))
	args := append([]string{"migrate", "--to", e.destAddr(), "--tls-dir", e.srcTLS,
		"--work-dir", e.srcWork, "--stats-json", statsPath}, extra...)
	args = append(args, fmt.Sprint(pid))
	out, code := e.phaulQuiet(e.hosts.Src, args...)
	r := result{out: out, code: code, flags: extra}
	if b, err := os.ReadFile(statsPath); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			r.stats = map[string]any{}
			if err := json.Unmarshal(sc.Bytes(), &r.stats); err != nil {
				e.t.Fatalf("stats json: %v\n%s", err, b)
			}
		}
	}
	if id := r.str("migration_id"); id != "" {
		e.t.Cleanup(func() { removeCgroup(e.t, id) })
	}
	checkPhases(e.t, r)
	checkHold(e.t, r)
	return r
}

// checkHold fails the test if a migration whose source tree was lazily
// dumped committed without holding it in a frozen cgroup on a host that
// has a freezer: a CRIU killed after COMMIT would have let it run beside
// the destination's (docs/protocol.md §6).
func checkHold(t testing.TB, r result) {
	lazy := r.str("final_dump") == "lazy" || r.str("mode") == "postcopy" || r.str("mode") == "hybrid"
	if r.str("result") != "ok" || !lazy {
		return
	}
	_, v1 := linux.FreezerV1Root()
	if v1 != nil && linux.HaveFreezerV2() != nil {
		return // no freezer: the source ends its copy at PREPARED
	}
	if r.num("hold_ms") <= 0 {
		t.Errorf("a lazily dumped source committed without its frozen hold (hold_ms %v, final dump %q, mode %q)",
			r.stats["hold_ms"], r.str("final_dump"), r.str("mode"))
	}
}

// checkPhases fails the test if the phases a migration recorded are not a
// path through the state machine (phaul/machine.go) from preflight.
func checkPhases(t testing.TB, r result) {
	if r.stats == nil {
		return
	}
	marks, _ := r.stats["phases"].([]any)
	var names []string
	prev := phaul.PhasePreflight
	for i, m := range marks {
		name, _ := m.(map[string]any)["phase"].(string)
		names = append(names, name)
		p, err := phaul.ParsePhase(name)
		switch {
		case err != nil:
			t.Errorf("stats phases %v: %v", names, err)
			return
		case i == 0 && p != phaul.PhasePreflight:
			t.Errorf("stats phases %v: the first is not preflight", names)
			return
		case i > 0 && !phaul.ValidTransition(prev, p):
			t.Errorf("stats phases %v: %s -> %s is not a transition of the state machine", names, prev, p)
			return
		}
		prev = p
	}
	if res := r.str("result"); res == "ok" && prev != phaul.PhaseDone {
		t.Errorf("stats phases %v: result ok, yet the last phase is %s", names, prev)
	}
}

// testCgroup makes cgroup /name in the freezer v1 and the cgroup v2
// hierarchy (whichever exist) and returns "/name". At cleanup it kills
// whatever still runs in it and removes it.
func testCgroup(t testing.TB, name string) string {
	t.Helper()
	var dirs []string
	for _, root := range []func() (string, error){linux.FreezerV1Root, linux.Cgroup2Root} {
		r, err := root()
		if err != nil {
			continue
		}
		dir := filepath.Join(r, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatalf("test cgroup: %v", err)
		}
		dirs = append(dirs, dir)
	}
	t.Cleanup(func() {
		for _, dir := range dirs {
			g := &cgroup.Group{Name: name, Paths: []string{dir}}
			if err := g.Kill(5 * time.Second); err != nil {
				t.Errorf("test cgroup %s: %v", dir, err)
			}
			if err := removeCgroupDir(dir); err != nil {
				t.Errorf("test cgroup %s: %v", dir, err)
			}
		}
	})
	return "/" + name
}

// removeCgroup removes phaul/<id> once its tree is gone (test cleanup kills
// workloads first: cleanups run last-in first-out).
func removeCgroup(t testing.TB, id string) {
	if h, err := cgroup.OpenHold(id+"-hold", "/"); err == nil && h != nil {
		if err := h.Kill(5 * time.Second); err != nil {
			t.Errorf("source hold of %s: %v", id, err)
		}
	}
	g, err := cgroup.Open(id)
	if err != nil {
		return
	}
	if err := g.Kill(5 * time.Second); err != nil {
		t.Errorf("cgroup %s: %v", id, err)
	}
	if err := g.Remove(); err != nil {
		t.Errorf("cgroup %s: %v", id, err)
	}
}

// assertMigrated checks the workload after a successful migration: exactly
// one copy runs, in the destination namespace, under a new pid; it keeps
// stepping, its steps never went back, and it verified all of its memory
// twice more after the restore.
func (e *env) assertMigrated(w *testenv.Workload, r result) int {
	t := e.t
	t.Helper()
	if r.code != 0 {
		t.Fatalf("migrate exit %d, want 0\n%s\nserve log:\n%s", r.code, r.out, e.readServeLog())
	}
	if r.str("result") != "ok" {
		t.Fatalf("stats result %q, want ok: %v", r.str("result"), r.stats)
	}
	var pid int
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		pids := w.Running(t)
		if len(pids) != 1 {
			return false, nil
		}
		pid = pids[0]
		return true, nil
	})
	if pids := w.Running(t); len(pids) != 1 {
		t.Fatalf("%d copies run after migration: %v", len(pids), pids)
	}
	if pid == w.PID() {
		t.Fatalf("the source process %d still runs; no copy on the destination", pid)
	}
	if dp := int(r.num("dest_pid")); !slices.Contains(nsPids(t, pid), dp) {
		t.Fatalf("stats dest_pid %d, running copy %d (NSpid %v)", dp, pid, nsPids(t, pid))
	}
	if in, err := e.hosts.Dst.Contains(pid); err != nil || !in {
		t.Fatalf("pid %d does not run in the destination namespace: %v", pid, err)
	}
	// It lives under the destination's cgroup parent, not in the
	// service's own cgroups nor in the migration's, which is gone.
	if !r.managedCgroups() {
		for _, h := range []string{"freezer", ""} {
			if got := procCgroup(t, pid, h); got != e.cgParent {
				t.Fatalf("pid %d in %q cgroup %q, want the destination's parent %q", pid, h, got, e.cgParent)
			}
		}
	}
	if _, err := cgroup.Open(r.str("migration_id")); err == nil {
		t.Fatalf("cgroup %s/%s left after the migration", cgroup.Parent, r.str("migration_id"))
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", w.PID())); err == nil {
		if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", w.PID())); !bytes.Contains(st, []byte(") Z")) {
			t.Fatalf("source process %d still exists: %s", w.PID(), st)
		}
	}
	before, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	var last testenv.Step
	deadline := time.Now().Add(time.Minute)
	for last.Verified < before.Verified+2 {
		if last, err = w.LastStep(); err != nil || w.Health() != nil {
			t.Fatalf("restored copy %d: %v, %v", pid, err, w.Health())
		}
		if time.Now().After(deadline) {
			t.Fatalf("restored copy %d verified its memory %d times in a minute (steps %d to %d); its threads:\n%s",
				pid, last.Verified-before.Verified, before.N, last.N, threadReport(pid))
		}
		time.Sleep(50 * time.Millisecond) // a poll interval against the deadline
	}
	w.WaitProgress(t, 5)
	w.CheckHealthy(t)
	e.assertNoImagesLeft()
	e.assertNothingForGC()
	return pid
}

// assertNothingForGC checks that phaul gc finds nothing on either host
// after a migration that succeeded.
func (e *env) assertNothingForGC() {
	e.t.Helper()
	for _, h := range []struct {
		ns  *testenv.Netns
		dir string
	}{{e.hosts.Src, e.srcWork}, {e.hosts.Dst, e.dstWork}} {
		if out, code := e.phaul(h.ns, "gc", "--work-dir", h.dir, "--show"); code != 0 || !strings.Contains(out, "nothing left over") {
			e.t.Fatalf("phaul gc --show %s after a successful migration: exit %d\n%s", h.dir, code, out)
		}
	}
}

// assertOnSource checks the workload after a failed migration: the source
// process still runs, alone, and keeps stepping healthily.
func (e *env) assertOnSource(w *testenv.Workload) {
	t := e.t
	t.Helper()
	pids := w.Running(t)
	if len(pids) != 1 || pids[0] != w.PID() {
		t.Fatalf("after a failed migration want only the source %d running, got %v", w.PID(), pids)
	}
	if in, err := e.hosts.Src.Contains(w.PID()); err != nil || !in {
		t.Fatalf("pid %d is not in the source namespace: %v", w.PID(), err)
	}
	w.WaitProgress(t, 5)
	w.CheckHealthy(t)
}

// assertNoImagesLeft checks that neither work dir holds a migration.
func (e *env) assertNoImagesLeft() {
	t := e.t
	t.Helper()
	for _, dir := range []string{e.srcWork, e.dstWork} {
		// The destination cleans up after it answered; give it a moment.
		testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
			return len(dirNames(t, dir)) == 0, nil
		})
	}
}

// assertNoCgroup checks that a failed migration left no cgroup behind.
func assertNoCgroup(t testing.TB, r result) {
	t.Helper()
	id := r.str("migration_id")
	if id == "" {
		return
	}
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		_, err := cgroup.Open(id)
		return err != nil, nil
	})
}

// procCgroup returns pid's cgroup in the v1 hierarchy with controller (or
// name=) h, or in cgroup v2 for h == "".
func procCgroup(t testing.TB, pid int, h string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		for _, c := range strings.Split(f[1], ",") {
			if c == h {
				return f[2]
			}
		}
	}
	t.Fatalf("pid %d has no %q cgroup:\n%s", pid, h, b)
	return ""
}

// nsPids returns pid's numbers in every PID namespace it is in, the host's
// first (NSpid in /proc/PID/status): the destination reports its own.
func nsPids(t testing.TB, pid int) []int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == "NSpid:" {
			var pids []int
			for _, s := range f[1:] {
				n, err := strconv.Atoi(s)
				if err != nil {
					t.Fatalf("NSpid %q: %v", line, err)
				}
				pids = append(pids, n)
			}
			return pids
		}
	}
	t.Fatalf("pid %d: no NSpid", pid)
	return nil
}

// tlsDirWithCAKey makes a node tls-dir that wrongly also holds its CA's
// ca.key (a CA created in it, node files copied in beside): serve and
// migrate must refuse it.
func (e *env) tlsDirWithCAKey(host string) string {
	e.t.Helper()
	dir := filepath.Join(e.dir, "tls-with-key")
	e.run(nil, "certs", "--ca-dir", dir, "--out", dir+"-node", "--host", host)
	for _, f := range []string{"node.crt", "node.key"} {
		b, err := os.ReadFile(filepath.Join(dir+"-node", f))
		if err != nil {
			e.t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			e.t.Fatal(err)
		}
	}
	return dir
}

// threadReport describes every thread of pid: state, the system call it is
// in (/proc/PID/task/TID/syscall) and its kernel wait channel.
func threadReport(pid int) string {
	var out strings.Builder
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s/", pid, task.Name())
		stat, _ := os.ReadFile(dir + "stat")
		sc, _ := os.ReadFile(dir + "syscall")
		wchan, _ := os.ReadFile(dir + "wchan")
		state := ""
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) {
			state = string(stat[i+2])
		}
		fmt.Fprintf(&out, "  tid %s state %s wchan %s syscall %s\n", task.Name(), state, wchan, bytes.TrimSpace(sc))
	}
	return out.String()
}

// removeCgroupDir removes an emptied cgroup directory. Its processes may
// have left cgroup.procs while still exiting, which keeps the cgroup
// populated (EBUSY) for a moment: retry for a few seconds.
func removeCgroupDir(dir string) error {
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		if err = os.Remove(dir); err == nil || !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond) // a poll interval against the deadline
	}
}

package test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/phaul/phaul/test/testenv"
)

// BenchmarkPageServer compares phaul's page path with CRIU's for 256 MiB
// and 1 GiB (skipped with -short) of three kinds of memory: the random
// pages of test/workload (incompressible), the heap of a python3 process
// holding a dict of millions of small strings and ints (a real program's
// heap; each victim is a fork of one process that built it, see
// pyHeapScript), and test/workload --fill zero (9 pages in 10 all zeros).
// Each iteration, in one process, with memory warmed before each measured
// step:
//
//  1. criu dump --leave-running --page-server into `criu page-server` (the
//     baseline), then into `phaul page-server --no-fsync` (like for like:
//     criu page-server never fsyncs), then into `phaul page-server`
//     (images fsynced before CLOSE is answered), on loopback inside the
//     source namespace: dump time and the bytes that crossed lo (TCP/IP
//     headers included). x-dump-time-vs-criu is phaul --no-fsync/criu,
//     x-fsync-dump-time-vs-criu phaul/criu, lower is better.
//  2. phaul migrate over the 1 Gbit/s shaped link, --compress off, then
//     --compress auto, each with a fresh victim: downtime and bytes_wire;
//     x-wire-bytes-vs-uncompressed is auto/off, lower is better.
//
// In the first iteration the pages CRIU's page server stored are also
// compressed with zstd at SpeedFastest (zstd -1) as one stream:
// zstd1-ratio is raw/compressed. The 256 MiB cases restore each kind once
// with criu from phaul page-server's images and check the copy (the
// workloads verify every page against their ledger; python checks every
// entry of its dict). Each case logs its line of the summary table, and
// the whole table is printed at the end.
func BenchmarkPageServer(b *testing.B) {
	var rows []pageBenchRow
	for _, mib := range []int{256, 1024} {
		b.Run(fmt.Sprintf("%dMiB", mib), func(b *testing.B) {
			if mib > 256 && testing.Short() {
				b.Skip("SKIP: the 1 GiB cases are left out with -short")
			}
			for _, v := range pageVictims {
				b.Run(v.name, func(b *testing.B) {
					row := benchPageServer(b, mib, v, mib == 256)
					rows = append(rows, row)
					b.Logf("\n%s", pageBenchTable([]pageBenchRow{row}))
				})
			}
		})
	}
	if len(rows) > 0 {
		// Printed, not logged: the testing package shows a parent
		// benchmark's log only with -v.
		fmt.Printf("BenchmarkPageServer summary (dump: criu dump --page-server on loopback; migrate: 1 Gbit/s link)\n%s",
			pageBenchTable(rows))
	}
}

// victim is a process the benchmark dumps and migrates.
type victim interface {
	PID() int
	Kill(tb testing.TB)
	// checkRestored checks the copy restored from a dump (the original is
	// gone): it runs and its memory is intact.
	checkRestored(tb testing.TB)
}

// pageVictim is a kind of victim. setup runs once per case, before the
// measured loop, and returns what starts one victim.
type pageVictim struct {
	name  string
	setup func(tb testing.TB, ns *testenv.Netns, mib int) func(testing.TB) victim
}

var pageVictims = []pageVictim{
	{"random", startFill("random")},
	{"python", startPyHeap},
	{"zero", startFill("zero")},
}

// pageBenchRow is one case's averages.
type pageBenchRow struct {
	name                      string
	criuDump, phaulDump       time.Duration
	phaulNoSyncDump           time.Duration // phaul page-server --no-fsync
	criuLoBytes, phaulLoBytes float64
	offDowntime, autoDowntime time.Duration
	offWire, autoWire         float64
	zstdRatio                 float64
	auto                      map[string]any // rounds[0].pages of the last auto migration
}

func benchPageServer(b *testing.B, mib int, v pageVictim, verify bool) pageBenchRow {
	e := newEnv(b, testenv.HostsOpts{RateBitsPerSec: 1e9})
	e.startServe()
	criu := testenv.RequireCRIU(b)
	// Warm what the next step fills: a dump into phaul's page server 2x
	// the workload in page cache (spool and images), a migration 3x (the
	// destination's spool, images and restored copy); plus slack.
	ps := &pageDumper{criu: criu, phaul: e.bin, ns: e.hosts.Src, warm: max(1<<30, (2*mib+256)<<20)}
	warmMigrate := max(1<<30, (3*mib+256)<<20)
	row := pageBenchRow{name: fmt.Sprintf("%dMiB/%s", mib, v.name)}
	start := v.setup(b, e.hosts.Src, mib)
	n := 0
	for b.Loop() {
		n++
		w := start(b)
		var inspect func(dir string)
		if n == 1 {
			inspect = func(dir string) { row.zstdRatio = zstdRatio(b, dir) }
		}
		d, lo := ps.dump(b, "criu", w.PID(), inspect)
		row.criuDump += d
		row.criuLoBytes += lo
		d, lo = ps.dump(b, "phaul", w.PID(), nil)
		row.phaulDump += d
		row.phaulLoBytes += lo
		d, _ = ps.dump(b, "phaul-nofsync", w.PID(), nil)
		row.phaulNoSyncDump += d
		if verify && n == 1 {
			// Once per kind: CRIU restores what phaul's page server
			// stored. A dump that kills the original, so that the
			// restored copy continues it alone.
			ps.restoreCheck(b, w)
			w = start(b)
		}
		for _, mode := range []string{"off", "auto"} {
			if mode == "auto" {
				w = start(b)
			}
			warmMemoryBytes(warmMigrate)
			r := e.migrateQuiet(w.PID(), "--mode", "cold", "--compress", mode)
			if r.code != 0 || r.str("result") != "ok" {
				b.Fatalf("migrate --compress %s: exit %d\n%s\nserve log:\n%s", mode, r.code, r.out, tail(e.readServeLog(), 20))
			}
			down := time.Duration(r.num("downtime_ms") * float64(time.Millisecond))
			if mode == "off" {
				row.offDowntime += down
				row.offWire += r.num("bytes_wire")
			} else {
				row.autoDowntime += down
				row.autoWire += r.num("bytes_wire")
				row.auto = roundPages(r)
			}
			w.Kill(b)
		}
	}
	div := func(d *time.Duration) { *d /= time.Duration(n) }
	div(&row.criuDump)
	div(&row.phaulDump)
	div(&row.phaulNoSyncDump)
	div(&row.offDowntime)
	div(&row.autoDowntime)
	row.criuLoBytes /= float64(n)
	row.phaulLoBytes /= float64(n)
	row.offWire /= float64(n)
	row.autoWire /= float64(n)

	b.ReportMetric(float64(row.phaulNoSyncDump)/float64(row.criuDump), "x-dump-time-vs-criu")
	b.ReportMetric(float64(row.phaulDump)/float64(row.criuDump), "x-fsync-dump-time-vs-criu")
	b.ReportMetric(msOf(row.phaulNoSyncDump), "phaul-ps-nofsync-dump-ms")
	b.ReportMetric(msOf(row.criuDump), "criu-ps-dump-ms")
	b.ReportMetric(msOf(row.phaulDump), "phaul-ps-dump-ms")
	b.ReportMetric(row.criuLoBytes/(1<<20), "criu-ps-wire-MiB")
	b.ReportMetric(row.phaulLoBytes/(1<<20), "phaul-ps-wire-MiB")
	b.ReportMetric(row.autoWire/row.offWire, "x-wire-bytes-vs-uncompressed")
	b.ReportMetric(msOf(row.offDowntime), "off-downtime-ms")
	b.ReportMetric(msOf(row.autoDowntime), "auto-downtime-ms")
	b.ReportMetric(row.offWire/(1<<20), "off-wire-MiB")
	b.ReportMetric(row.autoWire/(1<<20), "auto-wire-MiB")
	b.ReportMetric(row.zstdRatio, "zstd1-ratio")
	return row
}

func msOf(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// roundPages returns rounds[0].pages of a migration's stats.
func roundPages(r result) map[string]any {
	rounds, _ := r.stats["rounds"].([]any)
	if len(rounds) == 0 {
		return nil
	}
	round, _ := rounds[0].(map[string]any)
	pages, _ := round["pages"].(map[string]any)
	return pages
}

// pageDumper runs criu dump --page-server into either page server, in ns.
type pageDumper struct {
	criu, phaul string
	ns          *testenv.Netns
	warm        int // bytes warmed before each dump
	port        int // last port used
}

// dump dumps pid (which stays running) into a fresh page server of kind
// "criu" or "phaul" on 127.0.0.1 and returns how long criu dump took and
// the bytes lo carried meanwhile. inspect, if set, sees the images dir
// before it is removed.
func (p *pageDumper) dump(tb testing.TB, kind string, pid int, inspect func(dir string)) (time.Duration, float64) {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "images")
	if err := os.Mkdir(dir, 0o700); err != nil {
		tb.Fatal(err)
	}
	warmMemoryBytes(p.warm)
	srv := p.startServer(tb, kind, dir, pid)
	lo0 := loBytes(tb, pid)
	t0 := time.Now()
	p.criuDump(tb, pid, dir, srv.port, "--leave-running")
	d := time.Since(t0)
	lo := loBytes(tb, pid) - lo0
	srv.wait(tb)
	if inspect != nil {
		inspect(dir)
	}
	// Dirty page cache of this dump must not be flushed during the next.
	if err := os.RemoveAll(dir); err != nil {
		tb.Fatal(err)
	}
	return d, float64(lo)
}

// restoreCheck dumps w into phaul's page server without --leave-running,
// restores it with criu and checks the restored copy.
func (p *pageDumper) restoreCheck(tb testing.TB, w victim) {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "images")
	if err := os.Mkdir(dir, 0o700); err != nil {
		tb.Fatal(err)
	}
	srv := p.startServer(tb, "phaul", dir, w.PID())
	p.criuDump(tb, w.PID(), dir, srv.port)
	srv.wait(tb)
	pidfile := filepath.Join(dir, "restored.pid")
	p.criuRun(tb, dir, "restore.log", "restore", "--restore-detached", "--pidfile", pidfile)
	w.checkRestored(tb)
	w.Kill(tb)
}

func (p *pageDumper) criuDump(tb testing.TB, pid int, dir string, port int, extra ...string) {
	tb.Helper()
	p.criuRun(tb, dir, "dump.log", append([]string{"dump", "-t", strconv.Itoa(pid), "--network-lock", "nftables",
		"--page-server", "--address", "127.0.0.1", "--port", strconv.Itoa(port)}, extra...)...)
}

// criuRun runs criu in ns with its log in dir.
func (p *pageDumper) criuRun(tb testing.TB, dir, logName string, args ...string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	args = append(args, "-D", dir, "-o", logName)
	if out, err := p.ns.Command(ctx, p.criu, args...).CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, logName))
		tb.Fatalf("criu %s: %v\n%s\n%s", args[0], err, out, tail(string(log), 30))
	}
}

// pageServer is a running criu or phaul page server.
type pageServer struct {
	kind, log string
	dir       string // images dir; CRIU's server logs there
	port      int
	cmd       *exec.Cmd
	done      chan struct{}
}

// startServer starts a page server of kind on a port of its own in p.ns
// and waits until it listens (seen in /proc/PID/net/tcp of pid, a process
// in p.ns: a probe connection would be taken for CRIU's session).
func (p *pageDumper) startServer(tb testing.TB, kind, dir string, pid int) *pageServer {
	tb.Helper()
	p.port++
	s := &pageServer{kind: kind, dir: dir, port: 7100 + p.port, done: make(chan struct{})}
	s.log = filepath.Join(tb.TempDir(), kind+"-page-server.log")
	if kind == "criu" {
		s.cmd = p.ns.Command(context.Background(), p.criu, "page-server", "-D", dir,
			"--address", "127.0.0.1", "--port", strconv.Itoa(s.port), "-o", "page-server.log")
	} else {
		args := []string{"page-server", "--listen", fmt.Sprintf("127.0.0.1:%d", s.port), "--images-dir", dir}
		if kind == "phaul-nofsync" {
			args = append(args, "--no-fsync")
		}
		s.cmd = p.ns.Command(context.Background(), p.phaul, args...)
	}
	logf, err := os.Create(s.log)
	if err != nil {
		tb.Fatal(err)
	}
	defer logf.Close()
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		tb.Fatalf("start %s page server: %v", kind, err)
	}
	go func() { // owned by s; wait and cleanup wait for it
		s.cmd.Wait()
		close(s.done)
	}()
	tb.Cleanup(func() {
		s.cmd.Process.Kill() // no-op once it exited
		<-s.done
	})
	testenv.WaitFor(tb, 30*time.Second, func() (bool, error) {
		select {
		case <-s.done:
			return false, fmt.Errorf("%s page server exited: %v\n%s", kind, s.cmd.ProcessState, s.readLog())
		default:
		}
		return listening(pid, s.port)
	})
	return s
}

func (s *pageServer) readLog() string {
	b, _ := os.ReadFile(s.log)
	if s.kind == "criu" {
		l, _ := os.ReadFile(filepath.Join(s.dir, "page-server.log"))
		b = append(b, l...)
	}
	return tail(string(b), 20)
}

// wait waits for the server to exit after the session and checks it
// exited 0.
func (s *pageServer) wait(tb testing.TB) {
	tb.Helper()
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		tb.Fatalf("%s page server still runs a minute after the dump\n%s", s.kind, s.readLog())
	}
	if code := s.cmd.ProcessState.ExitCode(); code != 0 {
		tb.Fatalf("%s page server exit %d\n%s", s.kind, code, s.readLog())
	}
}

// listening reports whether a TCP socket listens on 127.0.0.1:port in the
// network namespace of pid.
func listening(pid, port int) (bool, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		return false, err
	}
	want := fmt.Sprintf("0100007F:%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == want && f[3] == "0A" { // TCP_LISTEN
			return true, nil
		}
	}
	return false, nil
}

// loBytes returns the bytes lo received in the network namespace of pid:
// each packet between two local sockets once, in either direction.
func loBytes(tb testing.TB, pid int) uint64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/dev", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(name) == "lo" {
			f := strings.Fields(rest)
			n, err := strconv.ParseUint(f[0], 10, 64)
			if err != nil {
				tb.Fatalf("/proc/%d/net/dev: %q: %v", pid, line, err)
			}
			return n
		}
	}
	tb.Fatalf("/proc/%d/net/dev: no lo\n%s", pid, b)
	return 0
}

// zstdRatio compresses the pages-*.img files in dir as one stream at
// SpeedFastest (zstd -1) and returns raw/compressed.
func zstdRatio(tb testing.TB, dir string) float64 {
	tb.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "pages-*.img"))
	if err != nil || len(files) == 0 {
		tb.Fatalf("no pages images in %s: %v", dir, err)
	}
	var out countWriter
	enc, err := zstd.NewWriter(&out, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		tb.Fatal(err)
	}
	var raw int64
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			tb.Fatal(err)
		}
		n, err := io.Copy(enc, f)
		f.Close()
		if err != nil {
			tb.Fatalf("zstd %s: %v", name, err)
		}
		raw += n
	}
	if err := enc.Close(); err != nil {
		tb.Fatal(err)
	}
	return float64(raw) / float64(max(out, 1))
}

type countWriter int64

func (c *countWriter) Write(p []byte) (int, error) {
	*c += countWriter(len(p))
	return len(p), nil
}

// warmMemoryBytes is warmMemory for n bytes: it touches n bytes and
// returns them to the kernel, so the next allocations reuse memory the
// hypervisor has already backed.
func warmMemoryBytes(n int) {
	b := make([]byte, n)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	b = nil
	debug.FreeOSMemory()
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// fillVictim is test/workload with --fill.
type fillVictim struct{ *testenv.Workload }

func startFill(fill string) func(testing.TB, *testenv.Netns, int) func(testing.TB) victim {
	return func(_ testing.TB, ns *testenv.Netns, mib int) func(testing.TB) victim {
		// The restore check (256 MiB only) waits for two full
		// verifications; a larger workload verifies rarely, so that its
		// verifier does not slow the benchmark's own steps on two CPUs.
		verify := 2 * time.Second
		if mib > 256 {
			verify = 20 * time.Second
		}
		return func(tb testing.TB) victim {
			return fillVictim{testenv.StartWorkload(tb, ns, testenv.WorkloadOpts{
				MiB: mib, Fill: fill, PagesPerSec: 1000, Verify: verify})}
		}
	}
}

// checkRestored waits for one copy to run and verify all its memory twice.
func (w fillVictim) checkRestored(tb testing.TB) {
	tb.Helper()
	var before testenv.Step
	testenv.WaitFor(tb, 30*time.Second, func() (bool, error) {
		if len(w.Running(tb)) != 1 {
			return false, nil
		}
		var err error
		before, err = w.LastStep()
		return err == nil, err
	})
	testenv.WaitFor(tb, 2*time.Minute, func() (bool, error) {
		last, err := w.LastStep()
		return last.Verified >= before.Verified+2, errors.Join(err, w.Health())
	})
	w.CheckHealthy(tb)
}

// pyHeapScript grows a dict of "user:%09d" -> 32-bit int until the
// process's RSS reaches argv[1] MiB and prints "ready". Then, for each line
// "spawn PATH" on stdin, it forks a copy of itself (the heap included) that
// is the init of a new PID namespace and the leader of a new session, with
// output in PATH, and prints "spawned PID". A copy prints "ready" and waits;
// on SIGUSR1 it checks every entry and prints "check ok" or "check bad".
// Building a 1 GiB heap takes 10-20 s here; a fork takes well under one.
// The spawner is the copies' subreaper and reaps them.
const pyHeapScript = `
import ctypes, os, signal, sys
target = int(sys.argv[1]) << 20
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
heap, n = {}, 0
while rss() < target:
    heap.update({"user:%09d" % i: (i * 2654435761) & 0xffffffff for i in range(n, n + 100000)})
    n += 100000
def check(sig, frame):
    ok = len(heap) == n and all(heap["user:%09d" % i] == (i * 2654435761) & 0xffffffff for i in range(n))
    os.write(1, b"check ok\n" if ok else b"check bad\n")
def reap(sig, frame):
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl: errno %d" % ctypes.get_errno())
signal.signal(signal.SIGCHLD, reap)
os.write(1, b"ready items=%d rss_mib=%d\n" % (n, rss() >> 20))
for line in sys.stdin:
    out = line.split(" ", 1)[1].strip()
    if os.fork():
        continue
    # unshare(CLONE_NEWPID) works once per process: in a child, whose
    # next child is the new namespace's init.
    if libc.unshare(0x20000000) != 0:
        os.write(1, b"error unshare errno %d\n" % ctypes.get_errno())
        os._exit(1)
    pid = os.fork()
    if pid:
        os.write(1, b"spawned %d\n" % pid)
        os._exit(0)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.closerange(3, 1 << 16)
    signal.signal(signal.SIGUSR1, check)
    os.write(1, b"ready\n")
    while True:
        signal.pause()
`

// pySpawner is a python3 process that built the heap once and forks the
// copies the benchmark dumps and migrates.
type pySpawner struct {
	out     string // its output: ready, spawned and error lines
	stdin   io.WriteCloser
	cmd     *exec.Cmd
	done    chan struct{}
	spawned int
}

// startPyHeap starts a pySpawner holding a heap of mib MiB in ns and
// returns its spawn.
func startPyHeap(tb testing.TB, ns *testenv.Netns, mib int) func(testing.TB) victim {
	tb.Helper()
	py := testenv.RequireCommand(tb, "python3")
	// pyenv and friends put a shell script first; start the interpreter.
	exe, err := exec.Command(py, "-c", "import sys; print(sys.executable)").Output()
	if err != nil {
		tb.Fatalf("python3: %v", err)
	}
	p := &pySpawner{out: filepath.Join(tb.TempDir(), "pyheap.out"), done: make(chan struct{})}
	out, err := os.Create(p.out)
	if err != nil {
		tb.Fatal(err)
	}
	defer out.Close()
	p.cmd = ns.Command(context.Background(), strings.TrimSpace(string(exe)), "-c", pyHeapScript, strconv.Itoa(mib))
	p.cmd.Stdout, p.cmd.Stderr = out, out
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		tb.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		tb.Fatalf("start python3: %v", err)
	}
	go func() { // owned by p; cleanup waits for it
		p.cmd.Wait()
		close(p.done)
	}()
	tb.Cleanup(func() {
		p.stdin.Close() // ends its loop; the kill makes sure
		p.cmd.Process.Kill()
		<-p.done
	})
	p.waitLine(tb, 5*time.Minute, "ready ")
	return p.spawn
}

// waitLine waits until p's output holds a line starting with prefix
// beyond the lines counted so far and returns it.
func (p *pySpawner) waitLine(tb testing.TB, timeout time.Duration, prefix string) string {
	tb.Helper()
	var line string
	testenv.WaitFor(tb, timeout, func() (bool, error) {
		select {
		case <-p.done:
			return false, fmt.Errorf("python3 exited: %v\n%s", p.cmd.ProcessState, readFile(p.out))
		default:
		}
		out := readFile(p.out)
		if strings.Contains(out, "\nerror ") {
			return false, fmt.Errorf("python3: %s", out)
		}
		var got []string
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, prefix) {
				got = append(got, l)
			}
		}
		if prefix == "spawned " && len(got) == p.spawned {
			line = got[len(got)-1]
			return true, nil
		}
		if prefix != "spawned " && len(got) > 0 {
			line = got[0]
			return true, nil
		}
		return false, nil
	})
	return line
}

// spawn forks a copy of the heap and waits until it is ready.
func (p *pySpawner) spawn(tb testing.TB) victim {
	tb.Helper()
	v := &pyHeap{out: filepath.Join(tb.TempDir(), "pyheap-copy.out")}
	if _, err := fmt.Fprintf(p.stdin, "spawn %s\n", v.out); err != nil {
		tb.Fatalf("python3 spawn: %v", err)
	}
	p.spawned++
	line := p.waitLine(tb, time.Minute, "spawned ")
	pid, err := strconv.Atoi(strings.TrimPrefix(line, "spawned "))
	if err != nil {
		tb.Fatalf("python3: %q", line)
	}
	v.pid = pid
	tb.Cleanup(func() { v.Kill(tb) })
	testenv.WaitFor(tb, time.Minute, func() (bool, error) {
		return strings.HasPrefix(readFile(v.out), "ready"), nil
	})
	return v
}

func readFile(name string) string {
	b, _ := os.ReadFile(name)
	return string(b)
}

// pyHeap is one copy of the python3 heap. Its restored copies are found by
// their stdout, v.out.
type pyHeap struct {
	out string
	pid int
}

func (v *pyHeap) PID() int { return v.pid }

// running returns the pids of v and its restored copies.
func (v *pyHeap) running() ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if link, err := os.Readlink("/proc/" + e.Name() + "/fd/1"); err == nil && link == v.out {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// Kill SIGKILLs v and every restored copy and waits until none runs.
func (v *pyHeap) Kill(tb testing.TB) {
	tb.Helper()
	testenv.WaitFor(tb, 10*time.Second, func() (bool, error) {
		pids, err := v.running()
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL) // ESRCH: already gone
		}
		return len(pids) == 0, err
	})
}

// checkRestored asks the one running copy to check its dict.
func (v *pyHeap) checkRestored(tb testing.TB) {
	tb.Helper()
	var pids []int
	testenv.WaitFor(tb, 30*time.Second, func() (bool, error) {
		var err error
		pids, err = v.running()
		return len(pids) == 1, err
	})
	if err := syscall.Kill(pids[0], syscall.SIGUSR1); err != nil {
		tb.Fatal(err)
	}
	testenv.WaitFor(tb, time.Minute, func() (bool, error) {
		out := readFile(v.out)
		if strings.Contains(out, "check bad") {
			return false, fmt.Errorf("restored python3 %d: its dict changed", pids[0])
		}
		return strings.Contains(out, "check ok"), nil
	})
}

// pageBenchTable formats rows, one line each.
func pageBenchTable(rows []pageBenchRow) string {
	var w strings.Builder
	fmt.Fprintf(&w, "%-13s %9s %9s %7s %9s %7s %11s | %9s %9s %9s %9s %7s | %6s | %s\n",
		"case", "criu-ps", "phaul-ps", "x-dump", "+fsync", "x-fsync", "lo MiB c/p",
		"off-down", "off-MiB", "auto-down", "auto-MiB", "x-wire", "zstd-1", "auto pages: total zero dup data compressed-batches link/zstd MB/s ratio switches")
	for _, r := range rows {
		pg := func(k string) uint64 {
			f, _ := r.auto[k].(float64)
			return uint64(f)
		}
		fmt.Fprintf(&w, "%-13s %7.0fms %7.0fms %7.2f %7.0fms %7.2f %5.0f/%5.0f | %7.0fms %9.1f %7.0fms %9.1f %7.3f | %6.2f | %d %d %d %d %d %.0f/%.0f %.2f %v\n",
			r.name, msOf(r.criuDump), msOf(r.phaulNoSyncDump), float64(r.phaulNoSyncDump)/float64(r.criuDump),
			msOf(r.phaulDump), float64(r.phaulDump)/float64(r.criuDump),
			r.criuLoBytes/(1<<20), r.phaulLoBytes/(1<<20),
			msOf(r.offDowntime), r.offWire/(1<<20), msOf(r.autoDowntime), r.autoWire/(1<<20), r.autoWire/r.offWire,
			r.zstdRatio, pg("pages"), pg("zero_pages"), pg("dup_pages"), pg("data_pages"), pg("compressed"),
			r.auto["link_mbps"], r.auto["zstd_mbps"], r.auto["zstd_ratio"], r.auto["compress_switches"])
	}
	return w.String()
}

// TestWorkloadFill checks test/workload's --fill modes, which
// BenchmarkPageServer relies on: each one's memory is as compressible as
// documented, verifies itself, and a flipped word is caught (page 1 is a
// zero page in zero mode).
func TestWorkloadFill(t *testing.T) {
	for _, tc := range []struct {
		fill     string
		min, max float64 // zstd -1 ratio of the region
	}{
		{"random", 0.9, 1.1},
		{"text", 3, 20},
		{"zero", 8, 1000},
	} {
		t.Run(tc.fill, func(t *testing.T) {
			w := testenv.StartWorkload(t, nil, testenv.WorkloadOpts{
				MiB: 4, Fill: tc.fill, PagesPerSec: -1, Verify: 10 * time.Millisecond})
			w.WaitProgress(t, 3)
			w.CheckHealthy(t)
			r := regionRatio(t, w)
			t.Logf("--fill %s: zstd -1 ratio %.2f", tc.fill, r)
			if r < tc.min || r > tc.max {
				t.Errorf("--fill %s: zstd -1 ratio %.2f, want %.1f..%.0f", tc.fill, r, tc.min, tc.max)
			}
			if err := w.CorruptPage(1); err != nil {
				t.Fatal(err)
			}
			if code := w.WaitExit(t, 30*time.Second); code != 3 {
				t.Fatalf("corrupted workload exit %d, want 3 (CORRUPT)", code)
			}
		})
	}
}

// regionRatio reads w's verified region through /proc/PID/mem and returns
// its zstd -1 ratio.
func regionRatio(t *testing.T, w *testenv.Workload) float64 {
	t.Helper()
	addr, pages, err := w.Region()
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", w.PID()))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	buf := make([]byte, pages*4096)
	if _, err := mem.ReadAt(buf, int64(addr)); err != nil {
		t.Fatalf("read region: %v", err)
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return float64(len(buf)) / float64(len(enc.EncodeAll(buf, nil)))
}

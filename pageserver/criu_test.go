package pageserver

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/pki"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/test/testenv"
)

// criuImages returns a fresh images dir for CRIU and the page server.
func criuImages(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "images")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// runCRIU runs criu with args, failing the test with the tail of its log
// (-o name in dir) if it fails.
func runCRIU(t *testing.T, ctx context.Context, criu, dir, logName string, args ...string) {
	t.Helper()
	args = append(args, "-D", dir, "-o", logName, "-v4")
	out, err := exec.CommandContext(ctx, criu, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("criu %s: %v\n%s\n%s", args[0], err, out, logTail(dir, logName))
	}
}

// logTail returns the last lines of a CRIU log in dir.
func logTail(dir, name string) string {
	data, _ := os.ReadFile(filepath.Join(dir, name))
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

// tlsArgs returns CRIU's TLS client options for a phaul tls-dir.
func tlsArgs(dir string) []string {
	return []string{"--tls", "--tls-cacert", filepath.Join(dir, pki.CACertFile),
		"--tls-cert", filepath.Join(dir, pki.NodeCertFile), "--tls-key", filepath.Join(dir, pki.NodeKeyFile)}
}

// restoreDetached restores the images in dir and returns the restored
// root's host pid.
func restoreDetached(t *testing.T, ctx context.Context, criu, dir string, extra ...string) int {
	t.Helper()
	pidfile := filepath.Join(dir, "restored.pid")
	runCRIU(t, ctx, criu, dir, "restore.log", append([]string{"restore", "--restore-detached", "--pidfile", pidfile}, extra...)...)
	data, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// TestCRIUDumpRestore is the interop test: real CRIU 4.2 dumps a 16 MiB
// self-verifying workload into phaul's page server (plain TCP, then CRIU's
// own GnuTLS client against a phaul tls-dir), the server commits the
// pagemap and pages images into CRIU's images dir at CLOSE, and CRIU
// restores the workload from them; the workload verifies its own memory.
func TestCRIUDumpRestore(t *testing.T) {
	criu := testenv.RequireCRIU(t)
	for _, mode := range []string{"tcp", "tls"} {
		t.Run(mode, func(t *testing.T) {
			w := testenv.StartWorkload(t, nil, testenv.WorkloadOpts{MiB: 16})
			w.WaitProgress(t, 3)
			images := criuImages(t)
			cfg := DefaultRunConfig()
			cfg.ImagesDir = images
			var extra []string
			if mode == "tls" {
				cfg.TLSDir = tlsDirs(t, "127.0.0.1")
				cfg.Peers = &transport.PeerPolicy{Allow: []string{"127.0.0.1"}}
				extra = tlsArgs(cfg.TLSDir)
			}
			s := runStandalone(t, cfg)
			port := strconv.Itoa(s.addr.(*net.TCPAddr).Port)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()

			runCRIU(t, ctx, criu, images, "dump.log", append([]string{"dump", "-t", strconv.Itoa(w.PID()),
				"--network-lock", "nftables", "--page-server", "--address", "127.0.0.1", "--port", port}, extra...)...)
			if code := w.WaitExit(t, 10*time.Second); code != -1 {
				t.Errorf("workload exit status %d, want -1 (killed by the dump)", code)
			}
			if err := s.wait(t, 10*time.Second); err != nil {
				t.Fatalf("page server: %v", err)
			}
			if mode == "tls" {
				if v := s.rec.wait("tls handshake", nil).attrs["version"]; v != "TLS 1.3" {
					t.Errorf("CRIU negotiated %v, want TLS 1.3", v)
				}
			}
			r := s.rec.wait("session done", nil)
			if pages := r.attrs["pages"].(uint64); pages < 16<<20/PageSize {
				t.Errorf("page server received %d pages, want at least the workload's 16 MiB", pages)
			}
			pm := readImages(t, images)["pagemap-1.img"]
			if pm == nil || pm.PresentPages() < 16<<20/PageSize {
				t.Fatalf("pagemap-1.img: %+v", pm)
			}

			pid := restoreDetached(t, ctx, criu, images)
			if pids := w.Running(t); !slices.Equal(pids, []int{pid}) {
				t.Fatalf("running copies %v, want the restored %d", pids, pid)
			}
			w.WaitProgress(t, 10)
			w.CheckHealthy(t)
		})
	}
}

// TestCRIULazyPages drives GET with real CRIU: a dump into a --keep page
// server commits the images (anonymous private pages flagged lazy-capable),
// then `criu restore --lazy-pages` restores the workload with those pages
// missing and `criu lazy-pages --page-server` fetches them from the same
// page server with GETs, until it sends CLOSE. The workload verifies its
// memory.
func TestCRIULazyPages(t *testing.T) {
	criu := testenv.RequireCRIU(t)
	w := testenv.StartWorkload(t, nil, testenv.WorkloadOpts{MiB: 16})
	w.WaitProgress(t, 3)
	images := criuImages(t)
	cfg := DefaultRunConfig()
	cfg.ImagesDir, cfg.Keep = images, true
	s := runStandalone(t, cfg)
	port := strconv.Itoa(s.addr.(*net.TCPAddr).Port)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	runCRIU(t, ctx, criu, images, "dump.log", "dump", "-t", strconv.Itoa(w.PID()),
		"--network-lock", "nftables", "--page-server", "--address", "127.0.0.1", "--port", port)
	w.WaitExit(t, 10*time.Second)
	s.rec.wait("session done", nil)
	lazy := 0
	for _, e := range readImages(t, images)["pagemap-1.img"].Entries {
		if e.Flags&uint32(FlagLazy) != 0 {
			lazy += int(e.NrPages)
		}
	}
	if lazy < 16<<20/PageSize {
		t.Fatalf("%d lazy-capable pages in the images, want the workload's 16 MiB", lazy)
	}

	daemon := exec.CommandContext(ctx, criu, "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", port,
		"-D", images, "-o", "lazy.log", "-v4")
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	daemonDone := make(chan error, 1)
	go func() { daemonDone <- daemon.Wait() }()
	defer func() {
		select {
		case <-daemonDone:
		default:
			daemon.Process.Kill()
			<-daemonDone
		}
	}()
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		_, err := os.Stat(filepath.Join(images, "lazy-pages.socket"))
		return err == nil, nil
	})
	pid := restoreDetached(t, ctx, criu, images, "--lazy-pages")
	select {
	case err := <-daemonDone:
		daemonDone <- err
		if err != nil {
			t.Fatalf("criu lazy-pages: %v\n%s", err, logTail(images, "lazy.log"))
		}
	case <-ctx.Done():
		t.Fatalf("criu lazy-pages still running\n%s", logTail(images, "lazy.log"))
	}
	var gets, pagesOut uint64
	testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
		if s.rec.count("session done") < 2 {
			return false, nil
		}
		r := s.rec.last("session done")
		gets, pagesOut = r.attrs["gets"].(uint64), r.attrs["pages_out"].(uint64)
		return true, nil
	})
	t.Logf("lazy-pages daemon: %d GETs, %d pages", gets, pagesOut)
	if gets == 0 || pagesOut < 16<<20/PageSize {
		t.Errorf("lazy restore fetched %d pages in %d GETs, want the workload's 16 MiB", pagesOut, gets)
	}
	if pids := w.Running(t); !slices.Equal(pids, []int{pid}) {
		t.Fatalf("running copies %v, want the restored %d", pids, pid)
	}
	w.WaitProgress(t, 10)
	w.CheckHealthy(t)
}

// phaulBinary builds cmd/phaul and skips the test while page-server is not
// one of its commands.
func phaulBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "phaul")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/phaul/phaul/cmd/phaul").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := exec.Command(bin, "page-server", "--help").Run(); err != nil {
		t.Skipf("SKIP: phaul has no page-server command (add pageServerCommand() to cmd/phaul/main.go): %v", err)
	}
	return bin
}

// TestCLI runs `phaul page-server` as CRIU's drop-in: it refuses a
// non-loopback address without --tls-dir, and serves one dump, after
// which it exits 0 and CRIU restores from its images.
func TestCLI(t *testing.T) {
	criu := testenv.RequireCRIU(t)
	bin := phaulBinary(t)
	images := criuImages(t)

	out, err := exec.Command(bin, "page-server", "--listen", "0.0.0.0:0", "--images-dir", images).CombinedOutput()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 1 || strings.Count(string(out), "\n") != 1 {
		t.Fatalf("non-loopback --listen without --tls-dir: %v, output %q; want exit 1 and one line", err, out)
	}

	w := testenv.StartWorkload(t, nil, testenv.WorkloadOpts{MiB: 16})
	w.WaitProgress(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := exec.CommandContext(ctx, bin, "--log-json", "page-server", "--listen", "127.0.0.1:0", "--images-dir", images)
	stderr, err := srv.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	// The reader owns stderr until phaul exits; it reports the listening
	// address and then phaul's exit.
	listening, srvDone := make(chan string, 1), make(chan error, 1)
	go func() {
		dec := json.NewDecoder(stderr)
		for {
			var m map[string]any
			if dec.Decode(&m) != nil {
				break
			}
			if a, ok := m["addr"].(string); ok && m["msg"] == "page server listening" {
				listening <- a
			}
		}
		close(listening)
		srvDone <- srv.Wait()
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-srvDone:
		case <-time.After(10 * time.Second):
			t.Error("phaul page-server did not exit")
		}
	})
	addr := <-listening
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("no listening line with an address: %q: %v", addr, err)
	}
	runCRIU(t, ctx, criu, images, "dump.log", "dump", "-t", strconv.Itoa(w.PID()),
		"--network-lock", "nftables", "--page-server", "--address", host, "--port", port)
	w.WaitExit(t, 10*time.Second)
	select {
	case err := <-srvDone:
		srvDone <- err // for the cleanup
		if err != nil {
			t.Fatalf("phaul page-server after the dump: %v, want exit 0", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("phaul page-server still runs after the dump's CLOSE")
	}
	pid := restoreDetached(t, ctx, criu, images)
	if pids := w.Running(t); !slices.Equal(pids, []int{pid}) {
		t.Fatalf("running copies %v, want the restored %d", pids, pid)
	}
	w.WaitProgress(t, 10)
	w.CheckHealthy(t)
}

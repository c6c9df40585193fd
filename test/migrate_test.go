package test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/test/testenv"
)

// TestColdMigration moves a self-verifying workload between two namespaced
// hosts with the phaul binary, as an operator would.
func TestColdMigration(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 64, Threads: 2, PagesPerSec: 2000})
	w.WaitProgress(t, 3)
	before, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	r := e.migrate(w.PID(), "--mode", "cold")
	e.assertMigrated(w, r)
	after, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	if after.N <= before.N {
		t.Fatalf("step went from %d to %d", before.N, after.N)
	}
	// The stats describe this migration.
	if r.num("downtime_ms") <= 0 || r.num("downtime_ms") > r.num("total_ms") {
		t.Errorf("downtime_ms %v, total_ms %v", r.stats["downtime_ms"], r.stats["total_ms"])
	}
	if r.num("bytes_images") < 64<<20 {
		t.Errorf("bytes_images %v: less than the workload's 64 MiB", r.stats["bytes_images"])
	}
	rounds, _ := r.stats["rounds"].([]any)
	if len(rounds) != 1 {
		t.Fatalf("rounds %v, want one for cold", r.stats["rounds"])
	}
	// The pages went through the page stream: the workload's 64 MiB of
	// distinct, non-zero pages among them, each with its bytes.
	pages, _ := rounds[0].(map[string]any)["pages"].(map[string]any)
	if pages == nil {
		t.Fatalf("round without page stream stats: %v", rounds[0])
	}
	if data, _ := pages["data_pages"].(float64); data < 64<<20/4096 {
		t.Errorf("page stream carried %v data pages, fewer than the workload's 64 MiB", data)
	}
	if wire, _ := pages["wire_bytes"].(float64); r.num("bytes_wire") < wire {
		t.Errorf("bytes_wire %v below the page stream's %v", r.stats["bytes_wire"], wire)
	}
	if r.str("mode") != "cold" || r.num("criu_dump_ms") <= 0 || r.num("criu_restore_ms") <= 0 {
		t.Errorf("stats incomplete: %v", r.stats)
	}
}

// TestBadInput feeds migrate what it must refuse; each case must fail with
// a one-line error, leave the workload running on the source, and leave
// nothing behind.
func TestBadInput(t *testing.T) {
	e := newEnv(t, testenv.HostsOpts{})
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 16, PagesPerSec: 500})

	// A second CA and certificates from it.
	otherCA := filepath.Join(e.dir, "other-ca")
	otherSrc := filepath.Join(e.dir, "tls-other-src")
	e.run(nil, "certs", "--ca-dir", otherCA, "--out", otherSrc, "--host", e.hosts.Src.Addr.String())
	// A tls dir holding the CA key.
	withKey := e.tlsDirWithCAKey(e.hosts.Src.Addr.String())
	// A destination certificate that does not name the address dialled.
	wrongName := filepath.Join(e.dir, "tls-wrong-name")
	e.run(nil, "certs", "--ca-dir", filepath.Join(e.dir, "ca"), "--out", wrongName, "--host", "10.77.0.99")
	// A source certificate of the same CA for a name the destination does
	// not allow (serve --allow-peer names only the source's address), and
	// one issued for a destination only.
	otherName := filepath.Join(e.dir, "tls-other-name")
	e.run(nil, "certs", "--ca-dir", filepath.Join(e.dir, "ca"), "--out", otherName, "--host", "nodeb.example", "--role", "source")
	destOnly := filepath.Join(e.dir, "tls-dest-only")
	e.run(nil, "certs", "--ca-dir", filepath.Join(e.dir, "ca"), "--out", destOnly, "--host", e.hosts.Src.Addr.String(), "--role", "destination")

	garbage := garbageServer(t)
	failingCRIU := filepath.Join(e.dir, "criu-fails")
	os.WriteFile(failingCRIU, []byte("#!/bin/sh\necho 'criu: simulated failure' >&2\nexit 42\n"), 0o755)
	readOnly := filepath.Join(e.dir, "read-only")
	os.MkdirAll(readOnly, 0o500)
	os.WriteFile(filepath.Join(readOnly, "file"), nil, 0o400)

	// Work dirs another local user could write into or swap.
	openWork := filepath.Join(e.dir, "work-open")
	os.Mkdir(openWork, 0o755)
	os.Chmod(openWork, 0o755)
	linkWork := filepath.Join(e.dir, "work-link")
	os.Symlink(e.dir, linkWork)

	tests := []struct {
		name string
		args []string // before the pid
		pid  string
		want string // in the error line
	}{
		{"no such pid", nil, "999999999", "does not exist"},
		{"not a pid", nil, "abc", "not a process id"},
		{"pid 1", nil, "1", "init"},
		{"own pid", nil, "$$", "phaul itself"},
		{"ancestor", nil, fmt.Sprint(os.Getpid()), "ancestor of phaul"},
		{"destination not listening", []string{"--to", e.hosts.Dst.Addr.String() + ":7999"}, "", "connection refused"},
		{"source cert from another CA", []string{"--tls-dir", otherSrc}, "", "not trusted"},
		{"source cert of the CA, name not allowed", []string{"--tls-dir", otherName}, "", "rejected"},
		{"destination-only cert", []string{"--tls-dir", destOnly}, "", "destination only"},
		{"tls dir holds ca.key", []string{"--tls-dir", withKey}, "", "ca.key"},
		{"garbage server", []string{"--to", garbage}, "", "tls"},
		{"criu missing", []string{"--criu", "/nonexistent/criu"}, "", "criu"},
		{"criu failing", []string{"--criu", failingCRIU}, "", "exit 42"},
		{"work dir not writable", []string{"--work-dir", filepath.Join(readOnly, "file", "sub")}, "", "work dir"},
		{"work dir others may enter", []string{"--work-dir", openWork}, "", "chmod 700"},
		{"work dir a symlink", []string{"--work-dir", linkWork}, "", "symlink"},
		{"bad mode", []string{"--mode", "warm"}, "", "mode"},
		{"bad manage-cgroups", []string{"--manage-cgroups=bogus"}, "", "manage-cgroups"},
		// Bare, as CRIU takes it, the flag means soft: "bogus" is then a second
		// argument beside the pid.
		{"manage-cgroups then a stray word", []string{"--manage-cgroups", "bogus"}, "", "usage"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pid := tt.pid
			if pid == "" {
				pid = fmt.Sprint(w.PID())
			}
			args := append([]string{"migrate", "--to", e.destAddr(), "--tls-dir", e.srcTLS, "--work-dir", e.srcWork}, tt.args...)
			var out string
			var code int
			if pid == "$$" {
				// exec keeps the shell's pid: phaul is asked to move itself.
				script := "exec " + e.bin + " " + strings.Join(args, " ") + " $$"
				out, code = e.phaulShell(script)
			} else if tt.name == "garbage server" {
				// The garbage server listens on the host's loopback.
				out, code = e.phaul(nil, append(args, pid)...)
			} else {
				out, code = e.phaul(e.hosts.Src, append(args, pid)...)
			}
			if code == 0 {
				t.Fatalf("exit 0, want failure\n%s", out)
			}
			last := lastLine(out)
			t.Logf("exit %d: %s", code, last)
			if !strings.HasPrefix(last, "phaul: ") || !strings.Contains(strings.ToLower(last), strings.ToLower(tt.want)) {
				t.Fatalf("error line %q does not say %q\n%s", last, tt.want, out)
			}
			ee := *e
			ee.t = t
			ee.assertOnSource(w)
			ee.assertNoImagesLeft()
		})
	}
	t.Run("wrong destination name", func(t *testing.T) {
		e2 := *e
		e2.t = t
		e2.dstTLS = wrongName
		e2.dstWork = filepath.Join(e.dir, "work-dst-2")
		// Same address, another port: a second service with the wrong cert.
		out, code := e.phaul(e.hosts.Src, "migrate", "--to", startAltServe(t, &e2, 7001), "--tls-dir", e.srcTLS,
			"--work-dir", e.srcWork, fmt.Sprint(w.PID()))
		if code == 0 || !strings.Contains(lastLine(out), "name") {
			t.Fatalf("exit %d, last line %q, want a name mismatch\n%s", code, lastLine(out), out)
		}
		e2.assertOnSource(w)
	})
	t.Run("destination with another CA refuses", func(t *testing.T) {
		// The destination trusts only otherCA: our source cert is refused and
		// the refusal is logged on the destination.
		e3 := *e
		e3.t = t
		otherDst := filepath.Join(e.dir, "tls-other-dst")
		e.run(nil, "certs", "--ca-dir", otherCA, "--out", otherDst, "--host", e.hosts.Dst.Addr.String())
		e3.dstTLS = otherDst
		e3.dstWork = filepath.Join(e.dir, "work-dst-3")
		addr := startAltServe(t, &e3, 7002)
		out, code := e.phaul(e.hosts.Src, "migrate", "--to", addr, "--tls-dir", e.srcTLS,
			"--work-dir", e.srcWork, fmt.Sprint(w.PID()))
		if code == 0 {
			t.Fatalf("exit 0 against a destination of another CA\n%s", out)
		}
		testenv.WaitFor(t, 10*time.Second, func() (bool, error) {
			return strings.Contains(e3.readServeLog(), "refused"), nil
		})
		e3.assertOnSource(w)
	})
}

// startAltServe starts another phaul serve (e's TLS and work dir) on port.
func startAltServe(t *testing.T, e *env, port int) string {
	t.Helper()
	e.serveLog = filepath.Join(e.dir, fmt.Sprintf("serve-%d.log", port))
	addr := fmt.Sprintf("%s:%d", e.hosts.Dst.Addr, port)
	e.startServeAt(addr)
	return addr
}

// garbageServer listens on loopback and answers every connection with bytes
// that are not TLS; it returns its address.
func garbageServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { // owned by the test; cleanup waits for it
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(strings.Repeat("HTTP/1.0 200 OK\r\n\r\nhello", 100)))
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// lastLine returns the error line phaul printed last in s, or the last line.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		// main prints the error once, prefixed "phaul: "; a log line
		// from a goroutine may still come after it.
		if strings.HasPrefix(lines[i], "phaul: ") {
			return lines[i]
		}
	}
	return lines[len(lines)-1]
}

package testenv

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestWorkloadMigratesWithCRIU checks the harness's contract with the
// end-to-end tests: a workload started by StartWorkload in src, with its
// modes on, is a tree that CRIU dumps and restores in dst with the flags
// WorkloadOpts names, and the harness then finds exactly one copy, in dst,
// whose steps went on. It drives the criu binary directly: phaul is not under
// test here.
func TestWorkloadMigratesWithCRIU(t *testing.T) {
	criu := RequireCRIU(t)
	tests := []struct {
		name  string
		opts  WorkloadOpts
		flags []string
		modes []string
	}{
		{
			name: "all",
			opts: WorkloadOpts{MiB: 64, PagesPerSec: 20000, TCPPair: true, Flock: true,
				Ghost: true, GhostKiB: 2048, Shm: true},
			flags: []string{"--tcp-established", "--file-locks", "--ext-unix-sk", "--ghost-limit", "4M"},
			modes: []string{"tcp", "flock", "ghost", "ext-unix"},
		},
		{
			name:  "link-remap",
			opts:  WorkloadOpts{MiB: 8, GhostLink: true},
			flags: []string{"--link-remap", "--ext-unix-sk"},
			modes: []string{"ghost", "ext-unix"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := NewHosts(t, HostsOpts{})
			sink := StartUnixSink(t, h.Src)
			tt.opts.ExtUnix = sink.Path
			w := StartWorkload(t, h.Src, tt.opts)
			w.WaitProgress(t, 10)
			mark := time.Now()
			dumped := migrate(t, criu, h, w, tt.flags)
			restored := time.Since(mark)
			w.WaitProgress(t, 25)
			w.CheckHealthy(t)
			// The ticker thread was restored too: a wakeup in the restored
			// copy ended the gap that spans the dump and the restore.
			tick, err := w.LongestTickGap(mark)
			stall, _ := w.LongestStall()
			t.Logf("dump and restore took %v; longest tick gap %v, step stall %v", restored, tick, stall)
			if err != nil || tick <= tickReport || tick > time.Since(mark) {
				t.Errorf("longest tick gap %v, %v; want the freeze: over %v, under %v", tick, err, tickReport, time.Since(mark))
			}
			for _, mode := range tt.modes {
				if !checkedAfter(t, w, dumped, mode) {
					t.Errorf("no %q line after step %d, the last before the dump", "ok "+mode, dumped)
				}
			}
			if tt.opts.Flock {
				checkLocked(t, w.FlockPath)
			}
			sink.WaitTicks(t, 5)
			w.Stop(t)
			w.CheckHealthy(t)
		})
	}
}

// TestWorkloadModesNeedCRIUFlags is the negative control of the test above:
// CRIU refuses to dump each mode's state without the mode's flag, naming the
// flag, so a migration test with the mode on does exercise it. A failed dump
// leaves the workload running, unharmed.
func TestWorkloadModesNeedCRIUFlags(t *testing.T) {
	criu := RequireCRIU(t)
	h := NewHosts(t, HostsOpts{})
	tests := []struct {
		name  string
		opts  WorkloadOpts
		cause string // in CRIU's error
	}{
		{"tcp", WorkloadOpts{TCPPair: true}, "consider using --tcp-established"},
		{"flock", WorkloadOpts{Flock: true}, "You can try --file-locks"},
		{"ghost over 1 MiB", WorkloadOpts{Ghost: true, GhostKiB: 2048}, "of 2097152 size, increase limit"},
		{"ghost-link", WorkloadOpts{GhostLink: true}, "Use link-remap option"},
		{"ext-unix", WorkloadOpts{}, "Consider using --ext-unix-sk"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.MiB = 4
			if tt.name == "ext-unix" {
				tt.opts.ExtUnix = StartUnixSink(t, h.Src).Path
			}
			w := StartWorkload(t, h.Src, tt.opts)
			images := t.TempDir()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			dump := h.Src.Command(ctx, criu, "dump", "-t", strconv.Itoa(w.PID()), "-D", images,
				"-o", "dump.log", "--network-lock", "nftables")
			if out, err := dump.CombinedOutput(); err == nil {
				t.Fatalf("criu dump without the mode's flag succeeded\n%s", out)
			}
			if log, _ := os.ReadFile(filepath.Join(images, "dump.log")); !strings.Contains(string(log), tt.cause) {
				t.Fatalf("dump failed, but not with %q:\n%s", tt.cause, logTail(images, "dump.log"))
			}
			if pids := w.Running(t); !slices.Equal(pids, []int{w.PID()}) {
				t.Fatalf("running %v after the failed dump, want [%d]", pids, w.PID())
			}
			w.WaitProgress(t, 5)
			w.CheckHealthy(t)
		})
	}
}

// checkedAfter reports whether the workload logged "ok <mode>" after the line
// of step n.
func checkedAfter(t *testing.T, w *Workload, n uint64, mode string) bool {
	t.Helper()
	lines, err := w.Lines("")
	if err != nil {
		t.Fatal(err)
	}
	after := false
	for _, l := range lines {
		if s, err := parseStep(l); err == nil && s.N > n {
			after = true
		}
		if after && strings.HasPrefix(l, "ok "+mode) {
			return true
		}
	}
	return false
}

// migrate dumps w in h.Src and restores it in h.Dst with the criu binary,
// running CRIU inside each netns so that the netns is not part of the images.
// It returns the last step logged before the dump.
func migrate(t *testing.T, criu string, h *Hosts, w *Workload, flags []string) uint64 {
	t.Helper()
	images := t.TempDir()
	// This machine kind has no iptables, CRIU's default TCP lock.
	flags = append([]string{"-D", images, "--network-lock", "nftables", "-v4"}, flags...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	dump := h.Src.Command(ctx, criu, append([]string{"dump", "-t", strconv.Itoa(w.PID()),
		"-o", "dump.log"}, flags...)...)
	if out, err := dump.CombinedOutput(); err != nil {
		t.Fatalf("criu dump: %v\n%s\n%s", err, out, logTail(images, "dump.log"))
	}
	if code := w.WaitExit(t, 10*time.Second); code != -1 {
		t.Errorf("source exit status %d, want -1 (killed by the dump)", code)
	}
	before, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	pidfile := filepath.Join(images, "restored.pid")
	restore := h.Dst.Command(ctx, criu, append([]string{"restore", "--restore-detached",
		"--pidfile", pidfile, "-o", "restore.log"}, flags...)...)
	if out, err := restore.CombinedOutput(); err != nil {
		t.Fatalf("criu restore: %v\n%s\n%s", err, out, logTail(images, "restore.log"))
	}
	data, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("dumped %d at step %d, restored as %d", w.PID(), before.N, pid)
	if pids := w.Running(t); !slices.Equal(pids, []int{pid}) {
		t.Fatalf("running copies %v, want the restored %d", pids, pid)
	}
	if in, err := h.Dst.Contains(pid); err != nil || !in {
		t.Errorf("restored %d not in %s: %v", pid, h.Dst.Name, err)
	}
	return before.N
}

// logTail returns the last lines of a CRIU log in dir.
func logTail(dir, name string) string {
	data, _ := os.ReadFile(filepath.Join(dir, name))
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

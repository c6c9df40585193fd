package phaul

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/wire"
)

func TestCheckTarget(t *testing.T) {
	tests := []struct {
		name string
		pid  int
		want string // "" = accepted
	}{
		{"init", 1, "init"},
		{"self", os.Getpid(), "phaul itself"},
		{"parent", os.Getppid(), "ancestor"},
		{"missing", 1 << 30, "does not exist"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "parent" && tt.pid == 1 {
				// Run from init (a container's or a PID namespace's first
				// process), the parent is init: the "init" case covers it.
				t.Skip("SKIP: this test's parent is pid 1; no ancestor other than init to refuse")
			}
			err := checkTarget(tt.pid)
			if !errors.Is(err, ErrBadTarget) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("checkTarget(%d) = %v, want ErrBadTarget saying %q", tt.pid, err, tt.want)
			}
		})
	}
}

func TestMigrateConfigValidate(t *testing.T) {
	good := DefaultMigrateConfig()
	good.To, good.TLSDir, good.PID = "10.0.0.2:7000", "/etc/phaul/tls", 42
	if err := good.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	tests := []struct {
		name   string
		mutate func(*MigrateConfig)
		want   string
	}{
		{"no port", func(c *MigrateConfig) { c.To = "10.0.0.2" }, "HOST:PORT"},
		{"no tls", func(c *MigrateConfig) { c.TLSDir = "" }, "tls-dir"},
		{"bad pid", func(c *MigrateConfig) { c.PID = -3 }, "pid"},
		{"bad mode", func(c *MigrateConfig) { c.Mode = "warm" }, "mode"},
		{"bad cgroups", func(c *MigrateConfig) { c.CRIU.ManageCgroups = "x" }, "manage-cgroups"},
		{"big ghost", func(c *MigrateConfig) { c.CRIU.GhostLimit = 1 << 40 }, "ghost-limit"},
		{"timeout", func(c *MigrateConfig) { c.CommitTimeout = 0 }, "timeouts"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.mutate(&c)
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Validate() = %v, want an error saying %q", err, tt.want)
			}
		})
	}
	// Every problem is reported, not only the first.
	bad := MigrateConfig{}
	err := bad.Validate()
	for _, want := range []string{"HOST:PORT", "tls-dir", "pid", "mode", "work dir", "timeouts"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("zero config: %v lacks %q", err, want)
		}
	}
}

func TestOptionsRoundTrip(t *testing.T) {
	o := criu.Options{TCPEstablished: true, FileLocks: true, ExtUnixSk: true, ShellJob: true,
		LinkRemap: true, GhostLimit: 16 << 20, ManageCgroups: "soft"}
	if got := optionsFromWire(optionsToWire(o)); got != o {
		t.Fatalf("round trip: %+v, want %+v", got, o)
	}
}

func TestStatsJSON(t *testing.T) {
	st := newStats("0123456789abcdef", ModeCold, "h:1", 7)
	st.mark(PhasePreflight)
	var buf bytes.Buffer
	if err := st.WriteJSON(&buf); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(buf.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	// The README's schema.
	for _, k := range []string{"migration_id", "mode", "result", "destination", "source_pid", "phases",
		"downtime_ms", "total_ms", "criu_dump_ms", "criu_restore_ms", "rtt_ms", "bytes_wire", "bytes_images", "rounds"} {
		if _, ok := m[k]; !ok {
			t.Errorf("stats JSON lacks %q: %s", k, buf.Bytes())
		}
	}
	phases := m["phases"].([]any)
	if p := phases[0].(map[string]any)["phase"]; p != "preflight" {
		t.Errorf("phase %v, want preflight", p)
	}
	if !slices.Contains([]string{ResultFailed}, m["result"].(string)) {
		t.Errorf("a migration that has not finished reads %v", m["result"])
	}
}

// TestCheckPeer: the destination must pass its own checks and have every
// CPU flag of the source.
func TestCheckPeer(t *testing.T) {
	host := func(ok bool, flags ...string) *wire.HostReport {
		return &wire.HostReport{Ok: ok, CpuFlags: flags,
			Items: []*wire.CheckItem{{Feature: "criu-check", Required: true, Available: ok, Detail: "x"}}}
	}
	tests := []struct {
		name     string
		src, dst *wire.HostReport
		want     string // "" = accepted
	}{
		{"same", host(true, "sse2", "avx2"), host(true, "sse2", "avx2"), ""},
		{"dst has more", host(true, "sse2"), host(true, "sse2", "avx512f"), ""},
		{"dst lacks avx2", host(true, "sse2", "avx2"), host(true, "sse2"), "avx2"},
		{"dst fails its checks", host(true, "sse2"), host(false, "sse2"), "criu-check"},
		{"no report", host(true, "sse2"), nil, "no report"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkPeer(tt.src, tt.dst)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("checkPeer = %v, want an error naming %q", err, tt.want)
			}
		})
	}
}

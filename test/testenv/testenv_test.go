package testenv

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Helpers the test binary runs as, re-executed inside a namespace.
const (
	helperEnv  = "PHAUL_TESTENV_HELPER"
	helperAddr = "PHAUL_TESTENV_ADDR"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		if err := helper(mode, os.Getenv(helperAddr)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// helper "echo" accepts one TCP connection on addr and echoes it, after
// printing "ready"; "dial" sends a line to addr and wants it back.
func helper(mode, addr string) error {
	switch mode {
	case "echo":
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		fmt.Println("ready")
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		_, err = io.Copy(c, c)
		return errors.Join(err, c.Close(), ln.Close())
	case "dial":
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := io.WriteString(c, "hello\n"); err != nil {
			return err
		}
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "hello\n" {
			return fmt.Errorf("echo from %s: %q, %v", addr, got, err)
		}
		return nil
	}
	return fmt.Errorf("unknown helper %q", mode)
}

// helperCmd runs this test binary as helper mode inside ns.
func helperCmd(ctx context.Context, ns *Netns, mode, addr string) *exec.Cmd {
	cmd := ns.Command(ctx, os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, helperAddr+"="+addr)
	return cmd
}

func TestHosts(t *testing.T) {
	var names []string
	t.Run("up", func(t *testing.T) {
		h := NewHosts(t, HostsOpts{})
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		all := []*Netns{h.Src, h.Dst, h.Cli}
		for _, ns := range all {
			names = append(names, ns.Name)
			ino, err := ns.Inode()
			if err != nil {
				t.Fatal(err)
			}
			out, err := ns.Command(ctx, "readlink", "/proc/self/ns/net").Output()
			if want := fmt.Sprintf("net:[%d]\n", ino); err != nil || string(out) != want {
				t.Errorf("%s: Command runs in %q, %v; want %q", ns.Name, out, err, want)
			}
		}
		if self, err := ProcNetns(os.Getpid()); err != nil || self == mustInode(t, h.Src) {
			t.Errorf("test's netns %d, %v: same as src", self, err)
		}
		for _, tt := range []struct {
			from, to *Netns
			addr     string
		}{
			{h.Src, h.Dst, "10.77.0.2"},
			{h.Dst, h.Src, "10.77.0.1"},
			{h.Cli, h.Src, "10.77.1.2"},
			{h.Src, h.Cli, "10.77.1.1"},
			{h.Cli, h.Dst, "10.77.2.2"},
			{h.Dst, h.Cli, "10.77.2.1"},
		} {
			t.Run(tt.from.Role()+"-"+tt.to.Role(), func(t *testing.T) {
				if got := tt.to.AddrTo(tt.from).String(); got != tt.addr {
					t.Fatalf("AddrTo = %s, want %s (hosts.sh's table)", got, tt.addr)
				}
				checkEcho(ctx, t, tt.from, tt.to)
			})
		}
		if h.Src.Addr != h.Src.AddrTo(h.Dst) || h.Dst.Addr != h.Dst.AddrTo(h.Src) ||
			h.Cli.Addr.String() != "10.77.1.1" {
			t.Errorf("Addr: src %s dst %s cli %s", h.Src.Addr, h.Dst.Addr, h.Cli.Addr)
		}
		if a := h.Src.AddrTo(h.Src); a.IsValid() {
			t.Errorf("AddrTo(self) = %s, want invalid", a)
		}
	})
	for _, name := range names {
		if _, err := os.Stat("/run/netns/" + name); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after cleanup: %v", name, err)
		}
	}
}

func mustInode(t *testing.T, ns *Netns) uint64 {
	t.Helper()
	ino, err := ns.Inode()
	if err != nil {
		t.Fatal(err)
	}
	return ino
}

// checkEcho dials to's address from from and checks the echo.
func checkEcho(ctx context.Context, t *testing.T, from, to *Netns) {
	t.Helper()
	addr := net.JoinHostPort(to.AddrTo(from).String(), "7777")
	srv := helperCmd(ctx, to, "echo", addr)
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Wait()
	defer srv.Process.Kill() // only if dial failed: echo ends after one
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "ready\n" {
		t.Fatalf("echo server in %s: %q, %v", to.Name, line, err)
	}
	if out, err := helperCmd(ctx, from, "dial", addr).CombinedOutput(); err != nil {
		t.Fatalf("dial %s from %s: %v\n%s", addr, from.Name, err, out)
	}
}

func TestHostsShaping(t *testing.T) {
	tests := []struct {
		name  string
		opts  HostsOpts
		qdisc string
	}{
		{"rate", HostsOpts{RateBitsPerSec: 200e6}, "tbf"},
		{"delay", HostsOpts{Delay: 5 * time.Millisecond}, "netem"}, // skips without sch_netem
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := NewHosts(t, tt.opts)
			for _, ns := range []*Netns{h.Src, h.Dst} {
				out, err := exec.Command("tc", "-n", ns.Name, "qdisc", "show").CombinedOutput()
				if err != nil || !strings.Contains(string(out), "qdisc "+tt.qdisc) {
					t.Errorf("%s qdiscs: %v\n%s", ns.Name, err, out)
				}
			}
			out, err := exec.Command("tc", "-n", h.Cli.Name, "qdisc", "show").CombinedOutput()
			if err != nil || strings.Contains(string(out), tt.qdisc) {
				t.Errorf("cli is shaped: %v\n%s", err, out)
			}
		})
	}
}

package lazy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/phaul/phaul/core/linux"
)

func TestConfigValidate(t *testing.T) {
	err := Config{FaultReads: -1, MaxChunkBytes: 100}.Validate()
	for _, want := range []string{"WorkDir", "ImagesDir", "Source", "FaultReads", "MaxChunkBytes"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: %v, want it to name %s", err, want)
		}
	}
}

// TestListenLongWorkDir: a work dir whose socket path exceeds sun_path is
// bound through the directory's descriptor; a client that reaches the
// socket by its place (CRIU connects relative to its work dir) gets
// through, and Close removes the socket file.
func TestListenLongWorkDir(t *testing.T) {
	long := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	if err := os.Mkdir(long, 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := Listen(Config{WorkDir: long, ImagesDir: long, Source: &patternSource{}})
	if err != nil {
		t.Fatalf("Listen in a %d-byte work dir: %v", len(long), err)
	}
	sock := filepath.Join(long, SocketName)
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s: %v, %v; want the socket there", sock, fi, err)
	}
	dir, err := os.Open(long)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), SocketName), Net: "unix"})
	if err != nil {
		t.Fatalf("connect by the socket's place: %v", err)
	}
	c.Close()
	d.Close()
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after Close %s: %v, want it removed", sock, err)
	}
}

// restore is a stand-in for CRIU's restore end of the socket.
func restore(t *testing.T, dir string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: filepath.Join(dir, SocketName), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func word(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

func listen(t *testing.T, dir string) *Daemon {
	t.Helper()
	d, err := Listen(Config{WorkDir: dir, ImagesDir: dir, Source: &patternSource{}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestServeEnds covers how a restore can end the session.
func TestServeEnds(t *testing.T) {
	requireUffd := func(t *testing.T) {
		if err := linux.HaveUserfaultfd(); err != nil {
			t.Skipf("SKIP: %v", err)
		}
	}
	tests := []struct {
		name string
		send func(t *testing.T, c *net.UnixConn)
		want error // nil: Serve succeeds
	}{
		{"no tasks", func(t *testing.T, c *net.UnixConn) { c.Write(word(finishWord)); c.Close() }, nil},
		{"zombie only", func(t *testing.T, c *net.UnixConn) { c.Write(word(uint32(0xffffff00))); c.Write(word(finishWord)) }, nil},
		{"closed before the finish", func(t *testing.T, c *net.UnixConn) { c.Close() }, ErrRestoreEnded},
		{"bad record", func(t *testing.T, c *net.UnixConn) { c.Write(word(0)) }, ErrProtocol},
		{"task without images", func(t *testing.T, c *net.UnixConn) {
			requireUffd(t)
			u, _, err := linux.OpenUffdReader(0)
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			c.Write(word(99))
			if err := linux.SendFD(c, []byte{0}, u.File()); err != nil {
				t.Fatal(err)
			}
		}, os.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			fds := countFDs(t)
			d := listen(t, dir)
			srv := startServe(t, d, 10*time.Second)
			c := restore(t, dir)
			tt.send(t, c)
			if err := srv.wait(); !errors.Is(err, tt.want) || (err == nil) != (tt.want == nil) {
				t.Fatalf("serve: %v, want %v", err, tt.want)
			}
			c.Close()
			d.Close()
			if n := countFDs(t); n != fds {
				t.Errorf("%d fds before, %d after", fds, n)
			}
			if _, err := os.Stat(filepath.Join(dir, SocketName)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket left after Serve: %v", err)
			}
		})
	}
}

// TestServeCancel: a restore that never comes; Serve ends with ctx and
// runs once.
func TestServeCancel(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, SocketName)
	if l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"}); err != nil {
		t.Fatal(err)
	} else {
		l.SetUnlinkOnClose(false)
		l.Close() // leaves a stale socket file, which Listen replaces
	}
	d := listen(t, dir)
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := d.Serve(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("serve: %v, want the deadline", err)
	}
	if err := d.Serve(context.Background()); !errors.Is(err, ErrServed) {
		t.Fatalf("second serve: %v, want ErrServed", err)
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

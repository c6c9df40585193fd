package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/core/pki"
)

func TestLoadTLS(t *testing.T) {
	p := newPKI(t)
	other := newPKI(t)
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		want    error
		file    string // named in the error
	}{
		{"ok", func(*testing.T, string) {}, nil, ""},
		{"CA key present", func(t *testing.T, dir string) {
			copyFile(t, p.dir, dir, pki.CAKeyFile)
		}, ErrCAKeyPresent, pki.CAKeyFile},
		{"missing CA cert", func(t *testing.T, dir string) {
			removeFile(t, dir, pki.CACertFile)
		}, fs.ErrNotExist, pki.CACertFile},
		{"missing node cert", func(t *testing.T, dir string) {
			removeFile(t, dir, pki.NodeCertFile)
		}, fs.ErrNotExist, pki.NodeCertFile},
		{"missing node key", func(t *testing.T, dir string) {
			removeFile(t, dir, pki.NodeKeyFile)
		}, fs.ErrNotExist, pki.NodeKeyFile},
		{"key readable by others", func(t *testing.T, dir string) {
			if err := os.Chmod(filepath.Join(dir, pki.NodeKeyFile), 0o644); err != nil {
				t.Fatal(err)
			}
		}, ErrKeyExposed, pki.NodeKeyFile},
		{"key readable by the group", func(t *testing.T, dir string) {
			if err := os.Chmod(filepath.Join(dir, pki.NodeKeyFile), 0o640); err != nil {
				t.Fatal(err)
			}
		}, ErrKeyExposed, pki.NodeKeyFile},
		{"key a symlink", func(t *testing.T, dir string) {
			key := filepath.Join(dir, pki.NodeKeyFile)
			if err := os.Rename(key, key+".real"); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(key+".real", key); err != nil {
				t.Fatal(err)
			}
		}, ErrKeyExposed, pki.NodeKeyFile},
		{"node key is the CA's key", func(t *testing.T, dir string) {
			b, err := os.ReadFile(filepath.Join(p.dir, pki.CAKeyFile))
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, dir, pki.NodeKeyFile, string(b))
			if err := os.Chmod(filepath.Join(dir, pki.NodeKeyFile), 0o600); err != nil {
				t.Fatal(err)
			}
			c, err := os.ReadFile(filepath.Join(dir, pki.CACertFile))
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, dir, pki.NodeCertFile, string(c))
		}, ErrCAKeyPresent, pki.NodeKeyFile},
		{"foreign key", func(t *testing.T, dir string) {
			copyFile(t, p.issue(t, "b"), dir, pki.NodeKeyFile)
		}, ErrBadIdentity, pki.NodeCertFile},
		{"cert from another CA", func(t *testing.T, dir string) {
			copyFile(t, other.dir, dir, pki.CACertFile)
		}, ErrBadIdentity, pki.NodeCertFile},
		{"garbage CA cert", func(t *testing.T, dir string) {
			writeFile(t, dir, pki.CACertFile, "garbage")
		}, ErrBadIdentity, pki.CACertFile},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := p.issue(t, "a.example")
			tt.prepare(t, dir)
			id, err := LoadTLS(dir)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (id != nil) {
				t.Fatalf("LoadTLS = %v, %v; want %v", id, err, tt.want)
			}
			if err != nil && !strings.Contains(err.Error(), tt.file) {
				t.Errorf("error %q does not name %s", err, tt.file)
			}
		})
	}
}

// TestCAKeyRefusedOnBothEnds checks that neither side can be started from
// a tls-dir holding the CA key: both load their identity with LoadTLS, and
// both refuse a config without one.
func TestCAKeyRefusedOnBothEnds(t *testing.T) {
	p := newPKI(t)
	dir := p.issue(t, "127.0.0.1")
	copyFile(t, p.dir, dir, pki.CAKeyFile)
	if _, err := LoadTLS(dir); !errors.Is(err, pki.ErrCAKeyPresent) {
		t.Fatalf("LoadTLS = %v, want ErrCAKeyPresent", err)
	}
	cfg := testConfig(nil, nil)
	if l, err := Listen(context.Background(), "127.0.0.1:0", cfg); err == nil {
		l.Close()
		t.Error("Listen accepted a config without identity")
	}
	if s, err := Dial(context.Background(), "127.0.0.1:1", cfg); err == nil {
		s.Close()
		t.Error("Dial accepted a config without identity")
	}
}

func TestMutualTLS(t *testing.T) {
	p := newPKI(t)
	log := newLogSink()
	l := listen(t, testConfig(p.identity(t, "localhost", "127.0.0.1"), log.logger()))
	_, port, _ := net.SplitHostPort(l.Addr().String())
	clientCfg := testConfig(p.identity(t, "client-a.example"), nil)
	for _, host := range []string{"127.0.0.1", "localhost"} {
		t.Run(host, func(t *testing.T) {
			ctx := context.Background()
			client, err := Dial(ctx, net.JoinHostPort(host, port), clientCfg)
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			server, err := l.Accept(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer server.Close()
			if got := server.Peer().CommonName; got != "client-a.example" {
				t.Errorf("server sees peer %q", got)
			}
			if got := client.Peer().CommonName; got != "localhost" {
				t.Errorf("client sees peer %q", got)
			}
			if m := log.wait(t, "peer authenticated"); m["name"] != "client-a.example" || m["peer"] == "" {
				t.Errorf("log record %v", m)
			}
			echo(t, client, server)
		})
	}
}

// echo opens the control stream and a pages stream and checks that both
// carry data both ways and arrive with their kinds.
func echo(t *testing.T, client, server *Session) {
	t.Helper()
	ctx := context.Background()
	for _, kind := range []StreamKind{KindControl, KindPages} {
		cs, err := client.OpenStream(ctx, kind)
		if err != nil {
			t.Fatal(err)
		}
		ss, err := server.AcceptStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ss.Kind() != kind || ss.ID() != cs.ID() {
			t.Fatalf("accepted %v stream %d, want %v stream %d", ss.Kind(), ss.ID(), kind, cs.ID())
		}
		if kind == KindControl && cs.ID() != 1 {
			t.Errorf("control stream has ID %d", cs.ID())
		}
		for _, dir := range []struct{ w, r *Stream }{{cs, ss}, {ss, cs}} {
			msg := []byte("hello " + kind.String())
			if _, err := dir.w.Write(msg); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(dir.r, got); err != nil || string(got) != string(msg) {
				t.Fatalf("read %q, %v; want %q", got, err, msg)
			}
		}
		cs.Close()
		ss.Close()
	}
}

func TestDialErrors(t *testing.T) {
	p := newPKI(t)
	other := newPKI(t)
	clientID := p.identity(t, "client-a.example")

	// foreignClient presents a certificate from another CA but trusts ours,
	// so that the server, not the client, ends the handshake.
	foreignClient := other.identity(t, "client-b.example")
	foreignClient = &Identity{Cert: foreignClient.Cert, Roots: clientID.Roots}

	tests := []struct {
		name      string
		serverID  *Identity // nil: nothing listens
		clientID  *Identity
		want      error
		cause     any    // pointer to a type errors.As must find
		refusal   string // reason the server logs, if it logs one
		wantErrno syscall.Errno
	}{
		{name: "server from another CA", serverID: other.identity(t, "127.0.0.1"), clientID: clientID,
			want: ErrPeerNotTrusted, cause: new(x509.UnknownAuthorityError), refusal: "client refused our certificate"},
		{name: "server names another host", serverID: p.identity(t, "node-b.example", "10.9.9.9"), clientID: clientID,
			want: ErrNameMismatch, cause: new(x509.HostnameError), refusal: "client refused our certificate"},
		{name: "client from another CA", serverID: p.identity(t, "127.0.0.1"), clientID: foreignClient,
			want: ErrPeerRejected, refusal: "client certificate not trusted"},
		{name: "nothing listening", clientID: clientID, wantErrno: syscall.ECONNREFUSED},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			log := newLogSink()
			addr := closedPort(t)
			if tt.serverID != nil {
				addr = listen(t, testConfig(tt.serverID, log.logger())).Addr().String()
			}
			s, err := Dial(context.Background(), addr, testConfig(tt.clientID, nil))
			if err == nil {
				s.Close()
				t.Fatal("Dial succeeded")
			}
			t.Logf("Dial: %v", err)
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("Dial error does not wrap %v", tt.want)
			}
			if tt.cause != nil && !errors.As(err, tt.cause) {
				t.Errorf("Dial error does not wrap %T", tt.cause)
			}
			if tt.wantErrno != 0 && !errors.Is(err, tt.wantErrno) {
				t.Errorf("Dial error does not wrap %v", tt.wantErrno)
			}
			var opErr *net.OpError
			if tt.wantErrno != 0 && !errors.As(err, &opErr) {
				t.Errorf("Dial error does not wrap the *net.OpError")
			}
			if tt.refusal != "" {
				if m := log.wait(t, "peer refused"); m["reason"] != tt.refusal || m["peer"] == "" || m["level"] != "WARN" {
					t.Errorf("server logged %v, want reason %q with peer", m, tt.refusal)
				}
			}
		})
	}
}

// TestDialNotPhaul dials servers that are not phaul servers: one that
// sends garbage, one that speaks TLS without our preface or without our
// ALPN protocol, one that never speaks.
func TestDialNotPhaul(t *testing.T) {
	p := newPKI(t)
	serverID := p.identity(t, "127.0.0.1")
	tests := []struct {
		name  string
		serve func(c net.Conn)
		is    error // for errors.Is
		as    any   // for errors.As
	}{
		{"garbage", func(c net.Conn) { c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) }, nil, new(tls.RecordHeaderError)},
		{"no preface", func(c net.Conn) {
			tc := tls.Server(c, serverID.serverTLS(nil))
			if tc.Handshake() == nil {
				tc.Write([]byte{0x42})
			}
			io.Copy(io.Discard, c) // until the client hangs up
		}, ErrProtocol, nil},
		{"silent", func(c net.Conn) { io.Copy(io.Discard, c) }, nil, new(net.Error)},
		{"no ALPN", func(c net.Conn) {
			conf := serverID.serverTLS(nil)
			conf.NextProtos = nil
			tc := tls.Server(c, conf)
			if tc.Handshake() == nil {
				tc.Write([]byte{prefaceAccepted})
			}
			io.Copy(io.Discard, c)
		}, ErrProtocol, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := rawServer(t, tt.serve)
			cfg := testConfig(p.identity(t, "client-a.example"), nil)
			cfg.HandshakeTimeout = 200 * time.Millisecond
			s, err := Dial(context.Background(), addr, cfg)
			if err == nil {
				s.Close()
				t.Fatal("Dial succeeded")
			}
			t.Logf("Dial: %v", err)
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("Dial error does not wrap %v", tt.is)
			}
			if tt.as != nil && !errors.As(err, tt.as) {
				t.Errorf("Dial error does not wrap %T", tt.as)
			}
		})
	}
}

// rawServer accepts connections on loopback and runs serve on each, until
// the test ends.
func rawServer(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			serve(c)
			c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

func copyFile(t *testing.T, from, to, name string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(from, name))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, name, string(data))
}

func writeFile(t *testing.T, dir, name, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

func removeFile(t *testing.T, dir, name string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

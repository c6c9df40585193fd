package transport

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestPeerPolicy: over real TLS on loopback, a certificate of the CA for an
// allowed name is admitted and one for another name refused (the finding:
// any certificate of the CA could act as a source); a serial added to the
// deny file is refused from the next handshake on, without a restart, and
// admitted again once removed. The negative control: without a policy the
// other name gets in.
func TestPeerPolicy(t *testing.T) {
	p := newPKI(t)
	serverID := p.identity(t, "127.0.0.1")
	allowed := p.identity(t, "nodea.example")
	other := p.identity(t, "nodeb.example")
	deny := filepath.Join(t.TempDir(), "deny")
	if err := os.WriteFile(deny, []byte("# revoked serials\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	policy := &PeerPolicy{Allow: []string{"NodeA.example"}, DenyFile: deny}
	if err := policy.Validate(); err != nil {
		t.Fatal(err)
	}
	sink := newLogSink()
	scfg := testConfig(serverID, sink.logger())
	scfg.Peers = policy
	l := listen(t, scfg)
	dial := func(id *Identity) error {
		ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
		defer cancel()
		s, err := Dial(ctx, l.Addr().String(), testConfig(id, nil))
		if err != nil {
			return err
		}
		defer s.Close()
		srv, err := l.Accept(ctx)
		if err != nil {
			return err
		}
		return srv.Close()
	}
	if err := dial(allowed); err != nil {
		t.Fatalf("allowed peer: %v", err)
	}
	if err := dial(other); err == nil {
		t.Fatal("a peer of the CA whose name is not allowed was admitted")
	}
	if rec := sink.wait(t, "peer refused"); rec["reason"] != "peer not allowed" {
		t.Fatalf("refusal logged as %v", rec)
	}
	serial := SerialString(allowed.Cert.Leaf.SerialNumber)
	if err := os.WriteFile(deny, []byte("# revoked serials\n"+serial+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := dial(allowed); err == nil {
		t.Fatal("a revoked serial was admitted")
	}
	if err := os.WriteFile(deny, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := dial(allowed); err != nil {
		t.Fatalf("allowed peer after its serial left the deny file: %v", err)
	}
	// A deny file that vanished refuses everyone.
	os.Remove(deny)
	if err := dial(allowed); err == nil {
		t.Fatal("admitted with the deny file gone")
	}
	// Negative control: no policy, the other name gets in.
	l2 := listen(t, testConfig(serverID, nil))
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	defer cancel()
	s, err := Dial(ctx, l2.Addr().String(), testConfig(other, nil))
	if err != nil {
		t.Fatalf("negative control: %v", err)
	}
	s.Close()
}

func TestPeerPolicyValidate(t *testing.T) {
	for _, p := range []*PeerPolicy{{}, {Allow: []string{"a"}, AnyPeer: true}, {Allow: []string{""}},
		{Allow: []string{"a"}, DenyFile: "/nonexistent/deny"}} {
		if err := p.Validate(); err == nil {
			t.Errorf("policy %+v: valid", p)
		}
	}
	if err := (&PeerPolicy{AnyPeer: true}).Validate(); err != nil {
		t.Error(err)
	}
	if _, err := parseDenyList([]byte("zz\n")); err == nil {
		t.Error("deny list: a non-hex serial parsed")
	}
	d, err := parseDenyList([]byte("0A:bc # node b\n\n"))
	if err != nil || !d["abc"] {
		t.Errorf("deny list: %v, %v", d, err)
	}
	if !errors.Is((&PeerPolicy{Allow: []string{"x"}, DenyFile: "/nonexistent"}).Authorize(nil), ErrPeerNotAllowed) {
		t.Error("missing deny file: not ErrPeerNotAllowed")
	}
}

// TestIdleHandshakesDropped: 64 connections that never speak, from one
// address and then from 64, do not keep a valid peer waiting: its dial
// completes well before the handshake timeout (issue 12: with 16 idle
// connections a valid source waited 9.7 s, with 48 it timed out), and each
// dropped connection is logged.
func TestIdleHandshakesDropped(t *testing.T) {
	p := newPKI(t)
	sink := newLogSink()
	scfg := testConfig(p.identity(t, "127.0.0.1"), sink.logger())
	scfg.HandshakeTimeout = 30 * time.Second
	l := listen(t, scfg)
	client := p.identity(t, "nodea.example")
	for _, spread := range []bool{false, true} {
		var idle []net.Conn
		for i := range 64 {
			d := net.Dialer{}
			if spread {
				d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i))}
			}
			c, err := d.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			idle = append(idle, c)
		}
		ctx, cancel := context.WithTimeout(context.Background(), scfg.HandshakeTimeout/3)
		s, err := Dial(ctx, l.Addr().String(), testConfig(client, nil))
		if err != nil {
			cancel()
			t.Fatalf("spread %v: a valid peer behind 64 idle connections: %v", spread, err)
		}
		srv, err := l.Accept(ctx)
		cancel()
		if err != nil {
			t.Fatalf("spread %v: accept: %v", spread, err)
		}
		srv.Close()
		s.Close()
		for _, c := range idle {
			c.Close()
		}
		if rec := sink.wait(t, "peer refused"); rec["reason"] != "handshake dropped for a newer connection" {
			t.Fatalf("drop logged as %v", rec)
		}
	}
}

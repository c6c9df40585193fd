package transport

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/phaul/phaul/core/pki"
)

// alpnProtocol names this transport's protocol in the TLS handshake; a peer
// speaking another version fails the handshake instead of misparsing frames.
const alpnProtocol = "phaul/1"

// Identity is a node's TLS material: its certificate and key, and the CA its
// peers must chain to. It is immutable and safe to share between Listen and
// Dial.
type Identity struct {
	// Cert is the node certificate chain and key; Cert.Leaf is set.
	Cert tls.Certificate
	// Roots holds the CA certificates from ca.crt.
	Roots *x509.CertPool
}

// LoadTLS reads ca.crt, node.crt and node.key from dir, as written by
// pki.IssueNode. It refuses a dir that holds ca.key (ErrCAKeyPresent): a node
// holding the CA key could mint certificates for any node. A missing file
// gives an error wrapping fs.ErrNotExist that names it; a node certificate
// that does not chain to ca.crt for both server and client use, has expired,
// or does not match node.key gives ErrBadIdentity.
func LoadTLS(dir string) (*Identity, error) {
	if _, err := os.Lstat(filepath.Join(dir, pki.CAKeyFile)); err == nil {
		return nil, fmt.Errorf("load TLS from %s: %w: remove %s from the node", dir, ErrCAKeyPresent, pki.CAKeyFile)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("load TLS from %s: %w", dir, err)
	}
	files := make(map[string][]byte, 3)
	for _, name := range []string{pki.CACertFile, pki.NodeCertFile, pki.NodeKeyFile} {
		read := os.ReadFile
		if name == pki.NodeKeyFile {
			read = readPrivate
		}
		data, err := read(filepath.Join(dir, name))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("load TLS from %s: missing %s (create it with phaul certs): %w", dir, name, err)
		}
		if err != nil {
			return nil, fmt.Errorf("load TLS from %s: %s: %w", dir, name, err)
		}
		files[name] = data
	}
	roots, err := parseRoots(files[pki.CACertFile])
	if err != nil {
		return nil, fmt.Errorf("load TLS from %s: %s: %w: %w", dir, pki.CACertFile, ErrBadIdentity, err)
	}
	cert, err := tls.X509KeyPair(files[pki.NodeCertFile], files[pki.NodeKeyFile])
	if err != nil {
		return nil, fmt.Errorf("load TLS from %s: %s: %w: %w", dir, pki.NodeCertFile, ErrBadIdentity, err)
	}
	// node.key must not be the CA's key under another name: a node that
	// holds it could mint certificates for every other node.
	if pub, ok := cert.Leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); ok {
		for block, rest := pem.Decode(files[pki.CACertFile]); block != nil; block, rest = pem.Decode(rest) {
			if ca, err := x509.ParseCertificate(block.Bytes); err == nil && pub.Equal(ca.PublicKey) {
				return nil, fmt.Errorf("load TLS from %s: %s: %w: it is the CA's key", dir, pki.NodeKeyFile, ErrCAKeyPresent)
			}
		}
	}
	// Catch a wrong CA or an expired certificate here, not at the peer.
	opts := x509.VerifyOptions{
		Roots:     roots,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if _, err := cert.Leaf.Verify(opts); err != nil {
		return nil, fmt.Errorf("load TLS from %s: %s: %w: %w", dir, pki.NodeCertFile, ErrBadIdentity, err)
	}
	return &Identity{Cert: cert, Roots: roots}, nil
}

// parseRoots reads every certificate in a PEM file; there must be one.
func parseRoots(data []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		pool.AddCert(cert)
		n++
	}
	if n == 0 {
		return nil, errors.New("no CERTIFICATE PEM block")
	}
	return pool, nil
}

// serverTLS demands a client certificate chaining to id's roots, for
// client use, that peers admits (nil: any).
func (id *Identity) serverTLS(peers *PeerPolicy) *tls.Config {
	var verify func(tls.ConnectionState) error
	if peers != nil {
		verify = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no client certificate")
			}
			return peers.Authorize(cs.PeerCertificates[0])
		}
	}
	return &tls.Config{
		VerifyConnection:       verify,
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{id.Cert},
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              id.Roots,
		NextProtos:             []string{alpnProtocol},
		SessionTicketsDisabled: true, // every migration authenticates in full
	}
}

// clientTLS verifies that the server chains to id's roots and names host.
func (id *Identity) clientTLS(host string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Present our certificate even if the server names other CAs:
		// crypto/tls would send none, and the server would log "no
		// certificate" instead of which CA signed ours.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &id.Cert, nil
		},
		RootCAs:    id.Roots,
		ServerName: host, // an IP literal is checked against IP SANs
		NextProtos: []string{alpnProtocol},
	}
}

// checkALPN fails a connection whose peer did not agree on alpnProtocol;
// crypto/tls lets a handshake without ALPN through.
func checkALPN(conn *tls.Conn) error {
	if p := conn.ConnectionState().NegotiatedProtocol; p != alpnProtocol {
		return fmt.Errorf("%w: peer negotiated protocol %q, want %q", ErrProtocol, p, alpnProtocol)
	}
	return nil
}

// classifyDial adds the sentinel that describes a failed client handshake
// or preface read, keeping the cause in the chain.
func classifyDial(err error) error {
	var (
		hostErr x509.HostnameError
		verify  *tls.CertificateVerificationError
	)
	switch {
	case errors.As(err, &hostErr):
		return fmt.Errorf("%w: %w", ErrNameMismatch, err)
	case errors.As(err, &verify):
		return fmt.Errorf("%w: %w", ErrPeerNotTrusted, err)
	case isRemoteAlert(err):
		// In TLS 1.3 the client finishes its handshake before the
		// server checks the client certificate, so a refusal arrives
		// here, on the preface read.
		return fmt.Errorf("%w: %w", ErrPeerRejected, err)
	}
	return err
}

// refusalReason names why a server handshake failed, for the log.
func refusalReason(err error) string {
	var (
		verify *tls.CertificateVerificationError
		record tls.RecordHeaderError
		netErr net.Error
	)
	switch {
	case errors.As(err, &verify):
		return "client certificate not trusted"
	case errors.Is(err, ErrPeerNotAllowed):
		return "peer not allowed"
	case isRemoteAlert(err):
		return "client refused our certificate"
	case errors.As(err, &record):
		return "not TLS"
	case errors.Is(err, ErrProtocol):
		return "not phaul"
	case errors.As(err, &netErr) && netErr.Timeout():
		return "handshake timeout"
	}
	return "handshake failed"
}

// isRemoteAlert reports whether err is a fatal TLS alert sent by the peer.
// crypto/tls reports one as a *net.OpError with this Op; the alert type
// itself is unexported.
func isRemoteAlert(err error) bool {
	var opErr *net.OpError
	return errors.As(err, &opErr) && opErr.Op == "remote error"
}

// readPrivate reads a private key file, refusing one that is a symlink or
// that group or others may read (ErrKeyExposed).
func readPrivate(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%w: %s is a symlink", ErrKeyExposed, path)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %04o (chmod 600 it)", ErrKeyExposed, path, perm)
	}
	return io.ReadAll(f)
}

// Serves reports whether the identity's certificate may act as a TLS
// server (a destination): its extended key usages name server auth.
func (id *Identity) Serves() bool {
	return slices.Contains(id.Cert.Leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
}

// Dials reports whether the identity's certificate may act as a TLS
// client (a source).
func (id *Identity) Dials() bool {
	return slices.Contains(id.Cert.Leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
}

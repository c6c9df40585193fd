package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Bounds on host names, from RFC 1035.
const (
	maxNameBytes  = 253
	maxLabelBytes = 63
)

// IssueNode signs a new node certificate for hosts with ca and writes
// ca.crt, node.crt and node.key (mode 0600) into outDir, creating outDir
// (mode 0700) if needed and replacing the files of an earlier issue. It never
// writes ca.key, and it fails with ErrCAKeyPresent if outDir holds one.
//
// Each host is a DNS name or an IP literal; the first one is also the
// certificate's common name. The certificate is valid NodeValidity and may
// be used as both TLS server and TLS client. IssueNode returns the new
// certificate.
func IssueNode(ca *CA, hosts []string, outDir string) (*x509.Certificate, error) {
	return IssueNodeWith(ca, NodeOptions{Hosts: hosts}, outDir)
}

// Role is what a node certificate may do: dial as a source (TLS client),
// listen as a destination (TLS server), or both.
type Role string

const (
	RoleSource      Role = "source"
	RoleDestination Role = "destination"
	RoleBoth        Role = "both"
)

// usages are the extended key usages of r.
func (r Role) usages() ([]x509.ExtKeyUsage, error) {
	switch r {
	case RoleSource:
		return []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, nil
	case RoleDestination:
		return []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, nil
	case RoleBoth, "":
		return []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, nil
	}
	return nil, fmt.Errorf("role %q: want source, destination or both", r)
}

// NodeOptions are what IssueNodeWith puts in a node certificate.
type NodeOptions struct {
	Hosts    []string
	Role     Role          // "" is RoleBoth
	Validity time.Duration // 0 is NodeValidity
}

// IssueNodeWith is IssueNode with a role (a source-only certificate
// cannot serve, a destination-only one cannot dial) and a lifetime.
func IssueNodeWith(ca *CA, o NodeOptions, outDir string) (*x509.Certificate, error) {
	hosts := o.Hosts
	usages, err := o.Role.usages()
	if err != nil {
		return nil, fmt.Errorf("issue node certificate: %w", err)
	}
	validity := o.Validity
	if validity == 0 {
		validity = NodeValidity
	}
	if validity < time.Hour || validity > CAValidity {
		return nil, fmt.Errorf("issue node certificate: validity %v: want between an hour and the CA's", validity)
	}
	dnsNames, ips, err := parseHosts(hosts)
	if err != nil {
		return nil, fmt.Errorf("issue node certificate: %w", err)
	}
	if err := os.MkdirAll(outDir, dirPerm); err != nil {
		return nil, fmt.Errorf("issue node certificate: %w", err)
	}
	switch ok, err := exists(filepath.Join(outDir, CAKeyFile)); {
	case err != nil:
		return nil, fmt.Errorf("issue node certificate: %w", err)
	case ok:
		return nil, fmt.Errorf("issue node certificate into %s: %w", outDir, ErrCAKeyPresent)
	}
	cert, certPEM, keyPEM, err := ca.sign(hosts[0], dnsNames, ips, usages, validity, time.Now())
	if err != nil {
		return nil, fmt.Errorf("issue node certificate: %w", err)
	}
	// The key goes first: a crash between files leaves a node.crt that
	// does not match node.key, which loading reports, never a usable pair
	// that belongs to someone else.
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{NodeKeyFile, keyPEM, keyPerm},
		{NodeCertFile, certPEM, certPerm},
		{CACertFile, ca.certPEM, certPerm},
	} {
		if err := writeFile(outDir, f.name, f.data, f.perm, true); err != nil {
			return nil, fmt.Errorf("issue node certificate into %s: %w", outDir, err)
		}
	}
	return cert, nil
}

// sign creates a node key and a certificate for it, valid from now.
func (ca *CA) sign(cn string, dnsNames []string, ips []net.IP, usages []x509.ExtKeyUsage, validity time.Duration,
	now time.Time) (*x509.Certificate, []byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, nil, err
	}
	notAfter := now.Add(validity)
	if notAfter.After(ca.Cert.NotAfter) {
		// A chain is only as valid as its CA.
		notAfter = ca.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"phaul"}, CommonName: cn},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           usages,
		BasicConstraintsValid: true,
		DNSNames:              dnsNames,
		IPAddresses:           ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, nil, err
	}
	return cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

// parseHosts splits hosts into DNS names and IP addresses, dropping
// duplicates. A host with a port, a zone or characters outside a DNS name is
// ErrBadHost.
func parseHosts(hosts []string) ([]string, []net.IP, error) {
	if len(hosts) == 0 {
		return nil, nil, ErrNoHosts
	}
	var (
		dnsNames []string
		ips      []net.IP
		seen     = make(map[string]bool, len(hosts))
	)
	for _, h := range hosts {
		if addr, err := netip.ParseAddr(h); err == nil {
			if addr.Zone() != "" {
				return nil, nil, fmt.Errorf("%w %q: IP with zone", ErrBadHost, h)
			}
			addr = addr.Unmap()
			if !seen[addr.String()] {
				seen[addr.String()] = true
				ips = append(ips, net.IP(addr.AsSlice()))
			}
			continue
		}
		if err := checkDNSName(h); err != nil {
			return nil, nil, fmt.Errorf("%w %q: %w", ErrBadHost, h, err)
		}
		name := strings.ToLower(strings.TrimSuffix(h, "."))
		if !seen[name] {
			seen[name] = true
			dnsNames = append(dnsNames, name)
		}
	}
	return dnsNames, ips, nil
}

// checkDNSName accepts letters, digits and hyphens in dot-separated labels
// (RFC 1123), with an optional trailing dot.
func checkDNSName(name string) error {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > maxNameBytes {
		return errors.New("not a DNS name")
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > maxLabelBytes {
			return errors.New("empty or long DNS label")
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return errors.New("DNS label starts or ends with '-'")
		}
		for _, c := range label {
			ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-'
			if !ok {
				return fmt.Errorf("character %q not allowed in a DNS name", c)
			}
		}
	}
	return nil
}

// encodeKey returns key as a PKCS #8 PEM block.
func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// parseKey reads an ECDSA key from a PKCS #8 PEM block.
func parseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("no PRIVATE KEY PEM block")
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key is %T, want ECDSA", key)
	}
	return ec, nil
}

// parseCert reads one certificate from a PEM block.
func parseCert(data []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("no CERTIFICATE PEM block")
	}
	return x509.ParseCertificate(block.Bytes)
}

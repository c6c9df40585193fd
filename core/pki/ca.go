package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// File names inside a CA directory and a node directory.
const (
	CACertFile   = "ca.crt"
	CAKeyFile    = "ca.key"
	NodeCertFile = "node.crt"
	NodeKeyFile  = "node.key"
)

// Validity periods of the certificates this package creates. NotBefore is
// set clockSkew in the past so that peers with slightly slow clocks accept a
// fresh certificate.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	NodeValidity = 90 * 24 * time.Hour
	clockSkew    = 5 * time.Minute
)

const (
	certPerm = 0o644
	keyPerm  = 0o600
	dirPerm  = 0o700
)

var (
	// ErrCAExists is returned by CreateCA when the directory already
	// holds ca.crt or ca.key.
	ErrCAExists = errors.New("pki: CA already exists")
	// ErrCAKeyPresent is returned when a node directory holds ca.key.
	ErrCAKeyPresent = errors.New("pki: node directory holds the CA key")
	// ErrNotCA is returned by LoadCA when ca.crt is not a CA certificate
	// or ca.key does not match it.
	ErrNotCA = errors.New("pki: not a usable CA")
	// ErrNoHosts is returned by IssueNode when given no hosts.
	ErrNoHosts = errors.New("pki: no hosts")
	// ErrBadHost is returned by IssueNode for a host that is neither an
	// IP address nor a DNS name.
	ErrBadHost = errors.New("pki: invalid host")
)

// CA is a certificate authority that can sign node certificates. Its key
// never leaves the CA directory except through IssueNode's signatures.
type CA struct {
	// Cert is the self-signed CA certificate.
	Cert    *x509.Certificate
	certPEM []byte
	key     crypto.Signer
}

// CreateCA creates a new CA in dir, creating dir (mode 0700) if needed, and
// returns it. It fails with ErrCAExists if dir already holds ca.crt or
// ca.key, and never replaces either. ca.key is written before ca.crt; if
// writing ca.crt fails, the new ca.key is removed again.
func CreateCA(dir string) (*CA, error) {
	if err := os.MkdirAll(dir, dirPerm); err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	for _, name := range []string{CACertFile, CAKeyFile} {
		ok, err := exists(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("create CA: %w", err)
		}
		if ok {
			return nil, fmt.Errorf("create CA in %s: %w: %s exists", dir, ErrCAExists, name)
		}
	}
	ca, keyPEM, err := newCA(time.Now())
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	if err := writeFile(dir, CAKeyFile, keyPEM, keyPerm, false); err != nil {
		return nil, fmt.Errorf("create CA in %s: %w", dir, existsAs(err, ErrCAExists))
	}
	if err := writeFile(dir, CACertFile, ca.certPEM, certPerm, false); err != nil {
		// Only our own key is removed: it was just linked into place.
		if rerr := os.Remove(filepath.Join(dir, CAKeyFile)); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return nil, fmt.Errorf("create CA in %s: %w", dir, existsAs(err, ErrCAExists))
	}
	return ca, nil
}

// LoadOrCreateCA loads the CA in dir, or creates one if dir holds neither
// ca.crt nor ca.key, and reports whether it created it. A dir holding only
// one of them is an error, never overwritten.
func LoadOrCreateCA(dir string) (ca *CA, created bool, err error) {
	ca, err = LoadCA(dir)
	if errors.Is(err, fs.ErrNotExist) {
		ca, err = CreateCA(dir)
		created = err == nil
	}
	return ca, created, err
}

// LoadCA reads the CA in dir. Missing files give an error wrapping
// fs.ErrNotExist; a certificate that is not a CA, or a key that does not
// match it, gives ErrNotCA.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	cert, err := parseCert(certPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA %s: %w", CACertFile, err)
	}
	key, err := parseKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA %s: %w", CAKeyFile, err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA %s: %w: certificate cannot sign certificates", dir, ErrNotCA)
	}
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("load CA %s: %w: key does not match certificate", dir, ErrNotCA)
	}
	return &CA{Cert: cert, certPEM: certPEM, key: key}, nil
}

// newCA makes a CA certificate and key valid from now and returns the CA
// and its key in PEM.
func newCA(now time.Time) (*CA, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	// A random suffix tells CAs apart in logs and error messages.
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"phaul"}, CommonName: "phaul CA " + hex.EncodeToString(serial.Bytes()[:4])},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return &CA{Cert: cert, certPEM: certPEM, key: key}, keyPEM, nil
}

// newSerial returns a random positive 128-bit serial number with the top bit
// set, so every serial encodes to the same length and is never zero.
func newSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 127)
	n, err := rand.Int(rand.Reader, limit)
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	return n.Add(n, limit), nil
}

// existsAs adds sentinel to err when err says a file already exists.
func existsAs(err, sentinel error) error {
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%w: %w", sentinel, err)
	}
	return err
}

package transport

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// ErrPeerNotAllowed: a peer with a valid certificate that the service's
// policy does not admit (its name not allowed, or its serial revoked).
var ErrPeerNotAllowed = errors.New("peer not allowed")

// PeerPolicy says which authenticated peers a listener admits: a
// certificate must chain to the CA (always) and, on top of that, name one
// of Allow in its subject alternative names (DNS names compared without
// case, IP addresses as addresses), unless AnyPeer says every certificate
// of the CA will do; and its serial must not be listed in DenyFile, which
// is read again whenever it changes (one serial a line, hex with or
// without colons, # comments), so revoking a node takes no restart. A
// DenyFile that cannot be read refuses every peer: a revocation list that
// vanished must not admit what it listed.
type PeerPolicy struct {
	Allow    []string
	AnyPeer  bool
	DenyFile string

	mu     sync.Mutex
	denyAt time.Time // DenyFile's mtime when read
	denySz int64
	deny   map[string]bool // serials, lower-case hex without colons
}

// Validate reports a policy that admits no one by mistake or everyone by
// default.
func (p *PeerPolicy) Validate() error {
	if len(p.Allow) == 0 && !p.AnyPeer {
		return errors.New("peer policy: no peer allowed: name each source (--allow-peer NAME) or say --allow-any-peer")
	}
	if len(p.Allow) > 0 && p.AnyPeer {
		return errors.New("peer policy: --allow-peer and --allow-any-peer together")
	}
	for _, a := range p.Allow {
		if a == "" || strings.ContainsAny(a, " \t\x00/") {
			return fmt.Errorf("peer policy: allowed peer %q: want a DNS name or an IP address", a)
		}
	}
	if p.DenyFile != "" {
		if _, err := p.denied(); err != nil {
			return err
		}
	}
	return nil
}

// Authorize admits or refuses cert, a peer's verified leaf certificate.
func (p *PeerPolicy) Authorize(cert *x509.Certificate) error {
	deny, err := p.denied()
	if err != nil {
		return err
	}
	if deny[SerialString(cert.SerialNumber)] {
		return fmt.Errorf("%w: certificate serial %s is revoked (%s)", ErrPeerNotAllowed, SerialString(cert.SerialNumber), p.DenyFile)
	}
	if p.AnyPeer || slices.ContainsFunc(p.Allow, func(a string) bool { return certNames(cert, a) }) {
		return nil
	}
	return fmt.Errorf("%w: certificate for %s (serial %s) is not among the allowed peers %v",
		ErrPeerNotAllowed, strings.Join(sanNames(cert), ", "), SerialString(cert.SerialNumber), p.Allow)
}

// certNames reports whether cert names name in its SANs.
func certNames(cert *x509.Certificate, name string) bool {
	if ip := net.ParseIP(name); ip != nil {
		return slices.ContainsFunc(cert.IPAddresses, ip.Equal)
	}
	return slices.ContainsFunc(cert.DNSNames, func(d string) bool { return strings.EqualFold(d, name) })
}

func sanNames(cert *x509.Certificate) []string {
	names := slices.Clone(cert.DNSNames)
	for _, ip := range cert.IPAddresses {
		names = append(names, ip.String())
	}
	return names
}

// SerialString is a certificate serial as logs and deny files write it:
// lower-case hex.
func SerialString(n *big.Int) string { return fmt.Sprintf("%x", n) }

// denied returns the deny list, read again if its file changed.
func (p *PeerPolicy) denied() (map[string]bool, error) {
	if p.DenyFile == "" {
		return nil, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	st, err := os.Stat(p.DenyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: deny list: %w", ErrPeerNotAllowed, err)
	}
	if p.deny != nil && st.ModTime().Equal(p.denyAt) && st.Size() == p.denySz {
		return p.deny, nil
	}
	b, err := os.ReadFile(p.DenyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: deny list: %w", ErrPeerNotAllowed, err)
	}
	deny, err := parseDenyList(b)
	if err != nil {
		return nil, fmt.Errorf("%w: deny list %s: %w", ErrPeerNotAllowed, p.DenyFile, err)
	}
	p.deny, p.denyAt, p.denySz = deny, st.ModTime(), st.Size()
	return deny, nil
}

// maxDenySerials bounds a deny list.
const maxDenySerials = 1 << 16

// parseDenyList reads one hex serial a line; # starts a comment.
func parseDenyList(b []byte) (map[string]bool, error) {
	deny := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		line = strings.ToLower(strings.ReplaceAll(strings.TrimSpace(line), ":", ""))
		if line == "" {
			continue
		}
		v, ok := new(big.Int).SetString(line, 16)
		if !ok || len(line) > 40 {
			return nil, fmt.Errorf("line %d: %q is no certificate serial (hex)", n, sc.Text())
		}
		if len(deny) == maxDenySerials {
			return nil, fmt.Errorf("more than %d serials", maxDenySerials)
		}
		deny[SerialString(v)] = true
	}
	return deny, sc.Err()
}

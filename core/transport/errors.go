package transport

import (
	"errors"

	"github.com/phaul/phaul/core/pki"
)

var (
	// ErrCAKeyPresent is returned by LoadTLS for a tls-dir that holds
	// ca.key. It is pki.ErrCAKeyPresent, so either name matches.
	ErrCAKeyPresent = pki.ErrCAKeyPresent
	// ErrKeyExposed is returned by LoadTLS for a node.key that group or
	// others may read, or that is a symlink: a key anyone else on the host
	// can read lets them act as this node.
	ErrKeyExposed = errors.New("transport: private key readable by others")
	// ErrBadIdentity is returned by LoadTLS when the files are present but
	// unusable: unparsable, mismatched, expired or not from ca.crt.
	ErrBadIdentity = errors.New("transport: unusable node certificate")
	// ErrPeerNotTrusted is returned by Dial when the server's certificate
	// does not chain to our CA (or has expired, or lacks ServerAuth). The
	// chain also holds the *tls.CertificateVerificationError.
	ErrPeerNotTrusted = errors.New("transport: peer certificate not trusted")
	// ErrNameMismatch is returned by Dial when the server's certificate
	// chains to our CA but does not name the host that was dialed. The
	// chain also holds the x509.HostnameError.
	ErrNameMismatch = errors.New("transport: peer certificate does not name the dialed host")
	// ErrPeerRejected is returned by Dial when the server refused the
	// handshake, typically because our certificate is not from its CA.
	ErrPeerRejected = errors.New("transport: peer rejected the handshake")
	// ErrProtocol is returned when the peer speaks TLS but not this
	// protocol: no "phaul/1" ALPN, or a wrong preface byte.
	ErrProtocol = errors.New("transport: protocol error")
	// ErrStreamKind is returned by OpenStream and AcceptStream for a
	// stream kind that is unknown or out of order: the control stream
	// must be the first stream and there is only one.
	ErrStreamKind = errors.New("transport: bad stream kind")
	// ErrWrongSide is returned by OpenStream on the accepting side and by
	// AcceptStream on the dialing side: only the dialer opens streams.
	ErrWrongSide = errors.New("transport: operation not allowed on this side")
)

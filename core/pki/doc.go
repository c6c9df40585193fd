// Package pki creates and loads the certificates phaul nodes use to
// authenticate each other.
//
// A CA directory holds ca.crt and ca.key (ECDSA P-256, self-signed, valid
// CAValidity). It is created once by CreateCA and read by LoadCA; CreateCA
// never overwrites an existing CA, so a reissued node certificate keeps
// chaining to the certificates already deployed.
//
// A node directory (a "tls-dir") holds ca.crt, node.crt and node.key, written
// by IssueNode or IssueNodeWith. A node certificate is valid NodeValidity (90
// days) unless told otherwise, carries the extended key usages of its role
// (a source: ClientAuth, it dials; a destination: ServerAuth, it listens;
// both) and names each host it was issued for: DNS names as DNS SANs, IP literals as
// IP SANs. A node directory never holds ca.key: IssueNode refuses a directory
// that does (ErrCAKeyPresent), and so does transport.LoadTLS, because a node
// that holds the CA key can mint certificates for every other node.
//
// Keys are PKCS #8 PEM files with mode 0600, certificates PEM with mode 0644.
// Every file is written atomically: temporary file in the same directory,
// fsync, rename (or link, where an existing file must not be replaced), fsync
// of the directory. A crash leaves either the old file or the new one.
//
// Nothing in this package logs or holds global state; every function is safe
// for concurrent use on distinct directories.
package pki

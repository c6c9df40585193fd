// Package pageserver speaks CRIU 4.2's page-server protocol (criu/page-xfer.c):
// the wire format, limits and session rules are in spec.md beside this file.
//
// Server is the receiving side. It accepts what `criu dump --page-server`,
// `criu pre-dump --page-server` and `criu lazy-pages --page-server` send
// (OPEN, OPEN2, PARENT, ADD, ADD_F, HOLE, GET, CLOSE, FORCE_CLOSE) and keeps
// the pages in a Store (*pagestore.Store, or anything with its methods),
// which it commits at CLOSE. It serves one session at a time: one Server
// per images dir. It detects a CRIU <= 4.1 peer by its 24-byte headers and
// refuses it (ErrVersion). Every count, size and address from the wire is
// bounded before use; malformed input ends that connection with one
// logged line (message "session failed" or "connection refused", the error
// under key "err", matching one of this package's sentinels) and never
// another session or the store: a range reaches the store only once all
// its pages have arrived.
//
// Client is the sending side, for tests and for phaul's own forwarding.
//
// Standalone (Listen, Run) is `phaul page-server`, a drop-in for
// `criu page-server`: plain TCP on loopback only, or TLS 1.3 with client
// certificates from a phaul tls-dir, which CRIU's own GnuTLS client
// (`criu dump --tls ...`) accepts.
package pageserver

// Package phaul moves a running process tree from one host to another.
//
// The source side is Migrate; the destination side is Server. They talk
// over one mutually authenticated TLS connection multiplexed with yamux
// (core/transport): stream 1 carries control messages (core/wire), other
// streams carry CRIU images (core/images). docs/protocol.md is the contract.
//
// The commit protocol guarantees that exactly one copy of the tree runs:
// the source's CRIU dump waits in its post-dump notification with the tree
// frozen and its network locked while the destination restores the tree
// stopped and answers PREPARED. Only then does the source let CRIU kill its
// tree and send COMMIT; only on COMMIT does the destination continue the
// restored tree. Any failure before that point fails the post-dump
// notification, so CRIU unlocks and resumes the source tree, and the
// destination kills what it restored. A destination holding PREPARED without
// COMMIT or ABORT (connection lost) keeps the tree stopped and reports it
// in doubt; it never resolves that alone.
package phaul

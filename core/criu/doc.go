// Package criu drives CRIU through its swrk RPC: one `criu swrk 3` child per
// action, talking CriuReq/CriuResp packets over a SOCK_SEQPACKET socket pair.
//
// It finds the CRIU binary (Locate), runs check, version, dump and restore,
// and reports failures as *Error, which carries CRIU's exit status and the
// tail of the action's log. Dump and restore forward CRIU's notify scripts to
// a Notifier; a Notifier that returns an error makes CRIU roll back (for
// post-dump: unlock the network and resume the tree). The child is bound to
// the caller's context: cancelling it answers a pending notification with
// failure, then terminates CRIU.
//
// The package never parses CRIU's command-line output: everything, the
// version included, comes over RPC.
package criu

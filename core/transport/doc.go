// Package transport carries one migration between two phaul nodes over a
// single TCP connection: TLS 1.3 with mutual certificate authentication,
// multiplexed into streams by yamux.
//
// # Identity
//
// LoadTLS reads a node's tls-dir (ca.crt, node.crt, node.key, as written by
// pki.IssueNode) and refuses one holding ca.key. The listener requires and
// verifies a client certificate chaining to ca.crt; the dialer verifies that
// the server's certificate chains to ca.crt and names the host it dialed (a
// DNS SAN, or an IP SAN for an IP literal). Session.Peer reports the peer's
// verified certificate. Dial's errors say what went wrong: ErrPeerNotTrusted
// (wrong CA, expired), ErrNameMismatch (right CA, other host),
// ErrPeerRejected (the server refused our certificate), or the wrapped
// *net.OpError of a failed connect. The listener logs every refused peer at
// warn level (msg "peer refused", keys peer, reason, err) and keeps serving.
//
// # Wire
//
// All integers are single bytes; yamux frames are big-endian per its spec.
//
//  1. TCP; TLS 1.3 only, ALPN "phaul/1", client certificate required, no
//     session tickets. Handshake and step 2 are bounded by
//     Config.HandshakeTimeout.
//  2. The server writes one byte, 0x01, once it has verified the client.
//     In TLS 1.3 the client's handshake completes before the server has
//     checked the client certificate; this byte makes a refusal fail Dial.
//     Any other byte is ErrProtocol.
//  3. yamux (github.com/hashicorp/yamux spec.md); the dialer is the yamux
//     client and the only side that opens streams.
//  4. Every stream starts with one kind byte: 1 control, 2 images, 3 pages.
//     The control stream is the first stream, yamux ID 1, and the only one
//     of its kind; anything else is ErrStreamKind for that stream. The
//     accepting side waits at most Config.HandshakeTimeout for the byte.
//
// A stream's Read returns io.EOF both when the peer closes the stream and
// when the session ends, so protocols on top must mark their own end.
//
// # Control latency under bulk load
//
// Control messages share the connection with bulk image and page data, so
// the bytes queued ahead of a control message delay it.
// BenchmarkControlRTTUnderLoad measures control ping RTT while two bulk
// streams write flat out, against idle RTT (2 cores; "shaped" is a veth pair
// between two network namespaces with a 200 Mbit/s tbf on the sending side,
// no added delay; p50/p99):
//
//	loopback, 1 MiB windows                 idle 66/334µs
//	  yamux as is (frame = window)          load 1.3/3.6ms   22x/23x  715 MB/s
//	  64 KiB frames (shipped)               load 217µs/2.4ms 3.3x/7x  609 MB/s
//	  64 KiB frames, 256 KiB windows        load 219µs/1.0ms 3.4x/6x  579 MB/s
//	  control on a second TLS connection    load 112µs/1.5ms 1.8x/7x  624 MB/s
//	shaped 200 Mbit/s, config 25 MB/s       idle ~0.15/0.3ms
//	  default kernel, DefaultConfig (1 MiB) load 45/49ms              24 MB/s
//	  default kernel, 16 KiB frames         load 16/24ms
//	  TCP_NOTSENT_LOWAT 16 KiB, 16 KiB frames load 8.2/10.9ms         24 MB/s
//	  same, control on a second connection  load 5.4/10.9ms
//	  same, bulk paced at 24 MB/s           load 5.4/7.9ms
//
// The bytes queue in four places:
//
//  1. yamux's send queue: yamux sends a stream's data as one frame of up to
//     the whole window and writes a frame completely before the next, so a
//     control frame waited behind a window's worth per busy stream.
//     Stream.Write now splits writes into frames of 16 to 64 KiB
//     (Config.Bandwidth x 500µs): a control frame waits behind at most one
//     frame per busy stream. This is the 22x -> 3.3x on loopback.
//  2. The kernel's send buffer: it autotunes to megabytes and holds all
//     the window's bytes, 40 ms at 200 Mbit/s. Only TCP_NOTSENT_LOWAT bounds
//     the unsent bytes without limiting bytes in flight; this package may
//     not make that system call (core/linux may), so Config.Control is the
//     hook for it (net.ipv4.tcp_notsent_lowat is the host-wide fallback).
//     45 ms -> 8 ms on the shaped link, at the same throughput.
//  3. The receiver's socket buffer and TLS decryption: bounded by the
//     stream window, Config.Bandwidth x Config.RTT (256 KiB to 16 MiB).
//     Overstating the RTT costs control latency (1 MiB vs 256 KiB windows:
//     p99 2.4 vs 1.0 ms on loopback).
//  4. The bottleneck queue and bytes in flight: about 130-200 KB on the
//     shaped link (ss and tc show 64 KB GSO packets in the tbf and in
//     flight). It is shared by every connection on the path, which is why a
//     second TLS connection for control gains little (8.2 -> 5.4 ms p50,
//     the same p99) and is not used. Pacing bulk below the bottleneck
//     (SO_MAX_PACING_RATE, again through Config.Control) trims p99 to 8 ms.
//
// On a 200 Mbit/s link the floor is therefore about 5-10 ms under load:
// well under a pre-copy round, but not idle RTT.
//
// # Ownership
//
// A Listener owns its accept goroutine and one goroutine per handshake in
// progress (at most Config.MaxHandshakes); Close stops and waits for all of
// them. A Session owns its connection and yamux's goroutines; Close ends
// them and unblocks AcceptStream, Read and Write. Nothing here logs except
// through Config.Logger.
package transport

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
// streams write flat out, against idle RTT in the same run. Numbers from a
// 2-core VM, p50 / p99, ranges over repeated runs:
//
//	loopback, DefaultConfig (1 MiB windows, 64 KiB frames); idle 65 / 200µs
//	  frames as yamux makes them (= window)  1.3-1.6 / 4.4-5.3 ms  20x / 22x
//	  64 KiB frames (shipped)                250-330µs / 2.6-3.3ms  4x / 13x
//	  shipped, 256 KiB windows (RTT 1µs)     290µs / 1.2-1.9 ms     4x / 3-10x
//	  control on a second TLS connection     140-170µs / 0.9-1.4ms  3x / 4-9x
//	  bulk 450-670 MB/s throughout (CPU-bound: TLS on both ends)
//
//	veth between two netns, 200 Mbit/s tbf on the sending side, no added
//	delay; Config 25 MB/s (256 KiB windows, 16 KiB frames); idle 0.15 / 0.3ms
//	  DefaultConfig instead (1 MiB windows, 64 KiB frames)   45 / 49 ms
//	  kernel defaults, shipped frames                        16 / 24 ms
//	  kernel defaults, frames as yamux makes them            10.6 / 14 ms
//	  kernel defaults, control on a second connection         5.4 / 11 ms
//	  TCP_NOTSENT_LOWAT 16 KiB, shipped frames                8.2 / 11-14 ms
//	  TCP_NOTSENT_LOWAT 16 KiB, frames as yamux makes them   13-16 / 24 ms
//	  TCP_NOTSENT_LOWAT 16 KiB, control on a second conn      5.4 / 11 ms
//	  TCP_NOTSENT_LOWAT 16 KiB, bulk paced at 24 MB/s (*)     5.4 / 7.9 ms
//	  bulk 23.8 MB/s throughout; (*) a one-off experiment
//
// The bytes queue in four places:
//
//  1. yamux's send queue. yamux sends as much of a write as the window
//     allows as one frame and writes each frame whole, so a control frame
//     waited behind up to a window per busy stream. Stream.Write splits
//     writes into frames of Config.Bandwidth x 500µs, 16 to 64 KiB; a
//     control frame now waits behind at most one frame per busy stream
//     (loopback: 20x -> 4x at p50).
//  2. The kernel's send buffer. It autotunes to megabytes and holds what
//     the windows let through, tens of ms at 200 Mbit/s; smaller frames
//     alone do not help then. TCP_NOTSENT_LOWAT bounds the unsent bytes
//     without limiting bytes in flight, at no cost in throughput. This
//     package may not make that system call (only core/linux may), so
//     Config.Control is the hook for it; net.ipv4.tcp_notsent_lowat=16384
//     is the host-wide fallback. With it, 16 / 24 ms -> 8 / 11 ms.
//  3. The receiver's socket buffer and TLS decryption, bounded by the
//     stream window, Config.Bandwidth x Config.RTT clamped to 256 KiB-16
//     MiB. This dominates p99 on loopback: overstating the RTT costs
//     control latency, understating it costs throughput.
//  4. The bottleneck queue and the bytes in flight: 130-200 KB on the
//     shaped link (ss and tc show 64 KB GSO packets queued in the tbf and
//     unacknowledged). Every connection on the path shares it, so a second
//     TLS connection for control gains 3 ms at p50 and nothing at p99; it
//     is not used. Pacing bulk below the bottleneck (SO_MAX_PACING_RATE,
//     again through Config.Control) trims p99.
//
// Under load a control message thus waits about 5-10 ms on a 200 Mbit/s
// link and a few hundred µs (p99 a few ms) on fast ones: small next to a
// pre-copy round, far from idle RTT.
//
// # Ownership
//
// A Listener owns its accept goroutine and one goroutine per handshake in
// progress (at most Config.MaxHandshakes); Close stops and waits for all of
// them. A Session owns its connection and yamux's goroutines; Close ends
// them and unblocks AcceptStream, Read and Write. Nothing here logs except
// through Config.Logger.
package transport

package transport

import (
	"errors"
	"fmt"
	"log/slog"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

// Bounds on the per-stream receive window derived from Config.Bandwidth and
// Config.RTT. yamux refuses windows below minWindowBytes (its initial
// window); above maxWindowBytes one slow stream could hold too much memory on
// the receiver.
const (
	minWindowBytes = 256 << 10
	maxWindowBytes = 16 << 20
)

// Bounds on the payload of one yamux data frame written by Stream.Write.
// yamux writes a whole frame before the next queued one, so a control
// message waits behind at most one frame per busy stream. The frame is sized
// to take frameTime on the configured link, within these bounds: smaller
// frames cost throughput (each frame is two TLS records and two writes),
// larger ones delay control messages. See doc.go for the measurements.
const (
	minFrameBytes = 16 << 10
	maxFrameBytes = 64 << 10
	frameTime     = 500 * time.Microsecond
)

// Config configures both ends of a transport. The zero value is not valid;
// start from DefaultConfig.
type Config struct {
	// Identity is this node's certificate, key and CA, from LoadTLS.
	// Required.
	Identity *Identity

	// Logger receives warnings: refused peers, accept errors, yamux
	// errors. nil discards them.
	Logger *slog.Logger

	// HandshakeTimeout bounds the TCP connect (Dial), the TLS handshake and
	// preface, and the wait for a new stream's kind byte.
	HandshakeTimeout time.Duration

	// Bandwidth (bytes per second) and RTT describe the path between the
	// nodes. Their product, clamped to [256 KiB, 16 MiB], is each stream's
	// receive window: the bytes a stream may have in flight.
	Bandwidth int64
	RTT       time.Duration

	// KeepAliveInterval is how often an idle session pings its peer. A
	// ping not answered within WriteTimeout closes the session.
	KeepAliveInterval time.Duration

	// WriteTimeout bounds how long one frame may wait to be written to
	// the connection; past it the write fails (yamux's
	// ConnectionWriteTimeout).
	WriteTimeout time.Duration

	// StreamCloseTimeout is how long a stream closed locally waits for the
	// peer's close before it is reset.
	StreamCloseTimeout time.Duration

	// Peers, if set, is the listener's peer policy: which certificates of
	// the CA it admits (PeerPolicy). Dial ignores it.
	Peers *PeerPolicy

	// MaxHandshakes bounds the server handshakes in progress at once, and
	// MaxHandshakesPerAddr those from one address (0: no bound of its
	// own). A connection beyond a bound drops the oldest handshake under
	// it, so peers that never speak cannot keep a real one waiting for
	// HandshakeTimeout.
	MaxHandshakes        int
	MaxHandshakesPerAddr int

	// Control, if not nil, is called on every socket before it connects
	// (Dial) or listens (Listen; accepted sockets inherit its options),
	// as net.Dialer.Control. It is where the caller sets socket options
	// this package cannot: TCP_NOTSENT_LOWAT of about 16 KiB keeps bulk
	// data queued in user space, where control messages can pass it,
	// instead of in the kernel's send buffer (see doc.go).
	Control func(network, address string, c syscall.RawConn) error
}

// DefaultConfig returns a Config for a fast LAN: 1 GiB/s and 1 ms RTT, giving
// a 1 MiB stream window. Identity must still be set.
func DefaultConfig() Config {
	return Config{
		HandshakeTimeout:   10 * time.Second,
		Bandwidth:          1 << 30,
		RTT:                time.Millisecond,
		KeepAliveInterval:  15 * time.Second,
		WriteTimeout:       10 * time.Second,
		StreamCloseTimeout: time.Minute,
		MaxHandshakes:      16,

		MaxHandshakesPerAddr: 4,
	}
}

// Validate reports every problem with c.
func (c Config) Validate() error {
	var errs []error
	if c.Identity == nil {
		errs = append(errs, errors.New("identity is required (see LoadTLS)"))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"handshake timeout", c.HandshakeTimeout},
		{"RTT", c.RTT},
		{"keep-alive interval", c.KeepAliveInterval},
		{"write timeout", c.WriteTimeout},
		{"stream close timeout", c.StreamCloseTimeout},
	} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %v", d.name, d.v))
		}
	}
	if c.Bandwidth <= 0 {
		errs = append(errs, fmt.Errorf("bandwidth must be positive, got %d bytes/s", c.Bandwidth))
	}
	if c.MaxHandshakes <= 0 {
		errs = append(errs, fmt.Errorf("max handshakes must be positive, got %d", c.MaxHandshakes))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("transport config: %w", err)
	}
	return nil
}

// windowBytes is the bandwidth-delay product, clamped to what yamux accepts
// and what a receiver should buffer per stream.
func (c Config) windowBytes() uint32 {
	bdp := float64(c.Bandwidth) * c.RTT.Seconds()
	return uint32(min(max(bdp, minWindowBytes), maxWindowBytes))
}

// frameBytes is the largest data frame Stream.Write sends: frameTime worth
// of Bandwidth, clamped.
func (c Config) frameBytes() int {
	n := float64(c.Bandwidth) * frameTime.Seconds()
	return int(min(max(n, minFrameBytes), maxFrameBytes))
}

// logger returns c.Logger, or a logger that discards.
func (c Config) logger() *slog.Logger {
	if c.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Logger
}

// yamuxConfig maps c onto a yamux configuration logging to log.
func (c Config) yamuxConfig(log *slog.Logger) *yamux.Config {
	yc := yamux.DefaultConfig()
	yc.LogOutput = nil // yamux wants exactly one of LogOutput and Logger
	yc.Logger = slog.NewLogLogger(log.Handler(), slog.LevelWarn)
	yc.EnableKeepAlive = true
	yc.KeepAliveInterval = c.KeepAliveInterval
	yc.ConnectionWriteTimeout = c.WriteTimeout
	yc.StreamCloseTimeout = c.StreamCloseTimeout
	yc.MaxStreamWindowSize = c.windowBytes()
	return yc
}

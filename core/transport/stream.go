package transport

import (
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// Stream is one multiplexed, flow-controlled byte stream of a Session. Read,
// Write and Close are safe for concurrent use; concurrent Writes do not
// interleave.
type Stream struct {
	ys         *yamux.Stream
	kind       StreamKind
	frameBytes int        // largest frame Write sends
	wmu        sync.Mutex // makes each Write atomic: it may span several frames
}

// Kind reports what the stream carries.
func (s *Stream) Kind() StreamKind { return s.kind }

// ID returns the yamux stream ID; the control stream is 1.
func (s *Stream) ID() uint32 { return s.ys.StreamID() }

// Read reads data sent by the peer. It returns io.EOF after the peer closed
// the stream and all data has been read.
func (s *Stream) Read(p []byte) (int, error) { return s.ys.Read(p) }

// Write sends p, blocking while the stream's window is exhausted. It splits
// p into frames of 16 to 64 KiB (by Config.Bandwidth) so that frames of other
// streams, control messages above all, wait behind at most one such frame
// per busy stream instead of a whole window's worth.
func (s *Stream) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	total := 0
	for len(p) > 0 {
		n, err := s.ys.Write(p[:min(len(p), s.frameBytes)])
		total += n
		if err != nil {
			return total, err
		}
		p = p[n:]
	}
	return total, nil
}

// Close half-closes the stream: the peer reads io.EOF after the data sent so
// far, while this side may still read. A stream whose peer does not close it
// too is reset after Config.StreamCloseTimeout.
func (s *Stream) Close() error { return s.ys.Close() }

// SetDeadline sets the read and write deadlines; see net.Conn.
func (s *Stream) SetDeadline(t time.Time) error { return s.ys.SetDeadline(t) }

// SetReadDeadline sets the deadline for pending and future Reads.
func (s *Stream) SetReadDeadline(t time.Time) error { return s.ys.SetReadDeadline(t) }

// SetWriteDeadline sets the deadline for pending and future Writes.
func (s *Stream) SetWriteDeadline(t time.Time) error { return s.ys.SetWriteDeadline(t) }

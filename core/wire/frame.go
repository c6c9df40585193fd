package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"google.golang.org/protobuf/proto"
)

const (
	// FrameVersion is the framing version in every header.
	FrameVersion = 1
	headerLen    = 8
	// MaxPayload bounds one control message; control messages are small
	// (the largest is a Hello with a pre-flight report).
	MaxPayload = 1 << 20
)

// Protocol versions this build speaks, negotiated in Hello.
const (
	MinVersion = 1
	MaxVersion = 1
)

var (
	ErrVersion       = errors.New("wire: unsupported frame version")
	ErrFrame         = errors.New("wire: malformed frame")
	ErrFrameTooLarge = errors.New("wire: frame too large")
	ErrEmpty         = errors.New("wire: message has no body")
)

// appendFrame appends the frame for payload p to b.
func appendFrame(b, p []byte) []byte {
	var h [headerLen]byte
	h[0] = FrameVersion
	binary.BigEndian.PutUint32(h[4:], uint32(len(p)))
	return append(append(b, h[:]...), p...)
}

// readFrame reads one frame, reusing buf when it is large enough.
func readFrame(r io.Reader, buf []byte) ([]byte, error) {
	var h [headerLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	if h[0] != FrameVersion {
		return nil, fmt.Errorf("%w: %d", ErrVersion, h[0])
	}
	if h[1] != 0 || h[2] != 0 || h[3] != 0 {
		return nil, fmt.Errorf("%w: reserved bytes %x", ErrFrame, h[1:4])
	}
	n := binary.BigEndian.Uint32(h[4:])
	if n > MaxPayload {
		return nil, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n)
	}
	if uint32(cap(buf)) < n {
		buf = make([]byte, n) // n is bounded above
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("frame payload: %w", err)
	}
	return buf, nil
}

// decode reads one frame and unmarshals it; a Message without a body is
// ErrEmpty.
func decode(r io.Reader, buf []byte) (*Message, error) {
	p, err := readFrame(r, buf)
	if err != nil {
		return nil, err
	}
	m := &Message{}
	if err := proto.Unmarshal(p, m); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrFrame, err)
	}
	if m.Body == nil {
		return nil, ErrEmpty
	}
	return m, nil
}

func encode(m *Message) ([]byte, error) {
	if m.GetBody() == nil {
		return nil, ErrEmpty
	}
	p, err := proto.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("marshal: %w", err)
	}
	if len(p) > MaxPayload {
		return nil, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, len(p))
	}
	return appendFrame(nil, p), nil
}

// Conn sends and receives control messages on a stream.
type Conn struct {
	rw  io.ReadWriter
	wmu sync.Mutex // serialises Send
	buf []byte     // owned by Recv
}

// NewConn wraps a stream; the caller keeps ownership of rw and closes it.
func NewConn(rw io.ReadWriter) *Conn { return &Conn{rw: rw} }

// Send writes one message as one frame. Safe for concurrent use.
func (c *Conn) Send(m *Message) error {
	b, err := encode(m)
	if err != nil {
		return fmt.Errorf("send %s: %w", Name(m), err)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.rw.Write(b); err != nil {
		return fmt.Errorf("send %s: %w", Name(m), err)
	}
	return nil
}

// Recv reads one message. Not safe for concurrent use.
func (c *Conn) Recv() (*Message, error) {
	m, err := decode(c.rw, c.buf)
	if err != nil {
		return nil, fmt.Errorf("receive: %w", err)
	}
	return m, nil
}

// Name is a message's body type for logs and errors: "hello", "commit", ...
func Name(m *Message) string {
	switch m.GetBody().(type) {
	case *Message_Hello:
		return "hello"
	case *Message_HelloReply:
		return "hello_reply"
	case *Message_Restore:
		return "restore"
	case *Message_Prepared:
		return "prepared"
	case *Message_Commit:
		return "commit"
	case *Message_Committed:
		return "committed"
	case *Message_Abort:
		return "abort"
	case *Message_PostcopyDone:
		return "postcopy_done"
	case *Message_Ping:
		return "ping"
	case *Message_Pong:
		return "pong"
	case nil:
		return "empty"
	default:
		return fmt.Sprintf("%T", m.GetBody())
	}
}

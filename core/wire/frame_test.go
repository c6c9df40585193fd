package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func sample() []*Message {
	return []*Message{
		{Body: &Message_Hello{Hello: &Hello{MinVersion: 1, MaxVersion: 1, MigrationId: "0123456789abcdef",
			Mode: Mode_MODE_COLD, Host: &HostReport{Hostname: "a", CpuFlags: []string{"sse2", "avx2"},
				Items: []*CheckItem{{Feature: "criu", Available: true}}},
			Criu: &CriuOptions{TcpEstablished: true, GhostLimit: 1 << 20, ManageCgroups: "soft"}}}},
		{Body: &Message_HelloReply{HelloReply: &HelloReply{Version: 1, Accepted: true}}},
		{Body: &Message_Restore{Restore: &Restore{Files: []*FileInfo{{Name: "core-1.img", Size: 42}}}}},
		{Body: &Message_Prepared{Prepared: &Prepared{Pid: 77, RestoreNanos: 5}}},
		{Body: &Message_Commit{Commit: &Commit{}}},
		{Body: &Message_Committed{Committed: &Committed{Pid: 77}}},
		{Body: &Message_Abort{Abort: &Abort{Reason: "x"}}},
		{Body: &Message_Ping{Ping: &Ping{Seq: 3}}},
		{Body: &Message_Pong{Pong: &Pong{Seq: 3}}},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, m := range sample() {
		t.Run(Name(m), func(t *testing.T) {
			var buf bytes.Buffer
			c := NewConn(&buf)
			if err := c.Send(m); err != nil {
				t.Fatal(err)
			}
			got, err := c.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(got, m) {
				t.Fatalf("got %v, want %v", got, m)
			}
		})
	}
}

func TestOverPipe(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	done := make(chan error, 1)
	go func() {
		c := NewConn(a)
		for _, m := range sample() {
			if err := c.Send(m); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	c := NewConn(b)
	for _, want := range sample() {
		got, err := c.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func header(version byte, reserved byte, n uint32) []byte {
	h := make([]byte, headerLen)
	h[0], h[2] = version, reserved
	binary.BigEndian.PutUint32(h[4:], n)
	return h
}

func TestBadInput(t *testing.T) {
	valid, _ := encode(sample()[0])
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty stream", nil, io.EOF},
		{"short header", []byte{1, 0, 0}, io.ErrUnexpectedEOF},
		{"bad version", header(2, 0, 0), ErrVersion},
		{"reserved set", header(1, 1, 0), ErrFrame},
		{"too large", header(1, 0, MaxPayload+1), ErrFrameTooLarge},
		{"huge length", header(1, 0, 0xffffffff), ErrFrameTooLarge},
		{"stops mid-message", valid[:len(valid)-3], io.ErrUnexpectedEOF},
		{"garbage payload", append(header(1, 0, 4), 0xff, 0xff, 0xff, 0xff), ErrFrame},
		{"no body", header(1, 0, 0), ErrEmpty},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewConn(bytes.NewBuffer(tt.in)).Recv()
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestSendRefusesEmpty(t *testing.T) {
	if err := NewConn(new(bytes.Buffer)).Send(&Message{}); !errors.Is(err, ErrEmpty) {
		t.Fatalf("got %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	for _, m := range sample() {
		b, _ := encode(m)
		f.Add(b)
	}
	f.Add(header(1, 0, 0xffffffff))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := decode(bytes.NewReader(in), nil)
		if err != nil {
			return
		}
		b, err := encode(m)
		if err != nil {
			t.Fatalf("re-encode %v: %v", m, err)
		}
		m2, err := decode(bytes.NewReader(b), nil)
		if err != nil || !proto.Equal(m, m2) {
			t.Fatalf("round trip changed %v: %v", m, err)
		}
	})
}

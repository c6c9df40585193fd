package lazy

import (
	"encoding/binary"
	"errors"
	"io"
	"os"
	"testing"
)

// fakeConn replays a byte stream as a stream socket would: at most chunk
// bytes a read, and a byte that carries a descriptor ends its read and
// brings a fresh one (of /dev/null).
type fakeConn struct {
	data   []byte
	fdAt   map[int]bool
	pos    int
	chunk  int
	opened []*os.File
}

func (c *fakeConn) recv(b []byte) (int, []*os.File, error) {
	if c.pos == len(c.data) {
		return 0, nil, io.EOF
	}
	n := min(len(b), c.chunk, len(c.data)-c.pos)
	var files []*os.File
	for i := c.pos; i < c.pos+n; i++ {
		if c.fdAt[i] {
			f, err := os.Open(os.DevNull)
			if err != nil {
				return 0, nil, err
			}
			c.opened = append(c.opened, f)
			files = append(files, f)
			n = i - c.pos + 1
			break
		}
	}
	copy(b, c.data[c.pos:c.pos+n])
	c.pos += n
	return n, files, nil
}

// encodeRecords writes records as CRIU's restore sends them; fdAt marks
// the bytes carrying a userfaultfd.
func encodeRecords(recs []record) ([]byte, map[int]bool) {
	var b []byte
	fdAt := map[int]bool{}
	for _, r := range recs {
		switch r.kind {
		case recFinish:
			b = binary.LittleEndian.AppendUint32(b, finishWord)
		case recZombie:
			b = binary.LittleEndian.AppendUint32(b, uint32(-r.pid))
		case recTask:
			b = binary.LittleEndian.AppendUint32(b, uint32(r.pid))
			fdAt[len(b)] = true
			b = append(b, 0)
		}
	}
	return b, fdAt
}

// readAll decodes c to its end; the task records' files stay open.
func readAll(c *fakeConn) ([]record, error) {
	rr := recordReader{recv: c.recv}
	var recs []record
	for {
		r, err := rr.next()
		if err != nil {
			return recs, err
		}
		recs = append(recs, r)
	}
}

func TestRecordReader(t *testing.T) {
	valid := []record{{kind: recTask, pid: 1}, {kind: recZombie, pid: 7}, {kind: recTask, pid: maxPid}, {kind: recFinish}}
	data, fdAt := encodeRecords(valid)
	tests := []struct {
		name string
		data []byte
		fdAt map[int]bool
		n    int   // records decoded
		err  error // at the end
	}{
		{"valid", data, fdAt, 4, io.EOF},
		{"empty", nil, nil, 0, io.EOF},
		{"pid 0", []byte{0, 0, 0, 0}, nil, 0, ErrProtocol},
		{"pid above PID_MAX_LIMIT", binary.LittleEndian.AppendUint32(nil, maxPid+1), nil, 0, ErrProtocol},
		{"no descriptor", append(binary.LittleEndian.AppendUint32(nil, 5), 0), nil, 0, ErrProtocol},
		{"descriptor with the pid", append(binary.LittleEndian.AppendUint32(nil, 5), 0), map[int]bool{1: true}, 0, ErrProtocol},
		{"cut in a word", data[:2], nil, 0, io.ErrUnexpectedEOF},
		{"cut before the byte", data[:4], nil, 0, io.ErrUnexpectedEOF},
		{"record after the finish", append(data, data[:5]...), fdAt, 4, ErrProtocol},
		{"finish twice", binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, finishWord), finishWord), nil, 1, ErrProtocol},
	}
	for _, tt := range tests {
		for _, chunk := range []int{1, 3, 64} {
			c := &fakeConn{data: tt.data, fdAt: tt.fdAt, chunk: chunk}
			recs, err := readAll(c)
			if len(recs) != tt.n || !errors.Is(err, tt.err) {
				t.Errorf("%s, chunk %d: %d records, %v; want %d, %v", tt.name, chunk, len(recs), err, tt.n, tt.err)
			}
			checkFiles(t, c, recs)
		}
	}
}

// checkFiles closes the files records hold and fails t if the reader left
// any other open.
func checkFiles(t testing.TB, c *fakeConn, recs []record) {
	t.Helper()
	held := map[*os.File]bool{}
	for _, r := range recs {
		if r.uffd != nil {
			held[r.uffd] = true
		}
	}
	for _, f := range c.opened {
		if held[f] {
			f.Close()
		} else if f.Fd() != ^uintptr(0) {
			f.Close()
			t.Fatalf("a descriptor the reader refused is still open")
		}
	}
}

func FuzzRecordReader(f *testing.F) {
	data, _ := encodeRecords([]record{{kind: recTask, pid: 3}, {kind: recZombie, pid: 4}, {kind: recFinish}})
	f.Add(data, uint64(1)<<4, uint8(5))
	f.Add(data, uint64(0), uint8(1))
	f.Add([]byte{0x46, 0x54, 0x53, 0x52}, uint64(1), uint8(4))
	f.Fuzz(func(t *testing.T, data []byte, fdMask uint64, chunk uint8) {
		if len(data) > 256 {
			return
		}
		fdAt := map[int]bool{}
		for i := range 64 {
			if fdMask&(1<<i) != 0 {
				fdAt[i] = true
			}
		}
		c := &fakeConn{data: data, fdAt: fdAt, chunk: 1 + int(chunk%16)}
		recs, err := readAll(c)
		checkFiles(t, c, recs)
		if err == nil {
			t.Fatal("readAll ended without an error")
		}
		// What decoded encodes back to a prefix of the input, but for the
		// bytes carrying descriptors (any value is accepted).
		again, fds := encodeRecords(recs)
		if len(again) > len(data) {
			t.Fatalf("records %v re-encode to %x, input %x", recs, again, data)
		}
		for i := range again {
			if again[i] != data[i] && !fds[i] {
				t.Fatalf("records %v re-encode to %x, input %x", recs, again, data)
			}
		}
	})
}

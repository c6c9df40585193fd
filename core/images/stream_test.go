package images

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func writeFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	files := map[string][]byte{
		"inventory.img": []byte("inv"),
		"pages-1.img":   bytes.Repeat([]byte{7}, 3<<20+5),
		"empty.img":     nil,
	}
	writeFiles(t, src, files)
	var buf bytes.Buffer
	var last uint64
	sent, err := Send(&buf, src, func(n uint64) { last = n })
	if err != nil {
		t.Fatal(err)
	}
	if last != Total(sent) {
		t.Fatalf("progress ended at %d, sent %d", last, Total(sent))
	}
	got, err := Receive(&buf, dst, DefaultLimits(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !Equal(sent, got) {
		t.Fatalf("sent %v, received %v", sent, got)
	}
	for name, data := range files {
		b, err := os.ReadFile(filepath.Join(dst, name))
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("%s: %v, %d bytes differ", name, err, len(b))
		}
	}
}

func entry(kind byte, name string, mode uint32, size uint64) []byte {
	h := make([]byte, entryLen)
	h[0] = kind
	binary.BigEndian.PutUint16(h[2:], uint16(len(name)))
	binary.BigEndian.PutUint32(h[4:], mode)
	binary.BigEndian.PutUint64(h[8:], size)
	return append(h, name...)
}

func stream(parts ...[]byte) []byte {
	b := append([]byte(magic), version)
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func TestReceiveBadInput(t *testing.T) {
	lim := Limits{MaxFiles: 2, MaxFileBytes: 100, MaxBytes: 150}
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.ErrUnexpectedEOF},
		{"bad magic", []byte("XXXX\x01"), ErrFormat},
		{"bad version", []byte("PHIM\x02"), ErrFormat},
		{"no end", stream(), io.ErrUnexpectedEOF},
		{"unknown kind", stream(entry(9, "a", 0o600, 0)), ErrFormat},
		{"slash in name", stream(entry(kindFile, "../x", 0o600, 0)), ErrFormat},
		{"dotdot", stream(entry(kindFile, "..", 0o600, 0)), ErrFormat},
		{"nul in name", stream(entry(kindFile, "a\x00b", 0o600, 0)), ErrFormat},
		{"empty name", stream(entry(kindFile, "", 0o600, 0)), ErrFormat},
		{"bad mode", stream(entry(kindFile, "a", 0o4777, 0)), ErrFormat},
		{"file too large", stream(entry(kindFile, "a", 0o600, 101)), ErrLimit},
		{"total too large", stream(entry(kindFile, "a", 0o600, 100), make([]byte, 100), entry(kindFile, "b", 0o600, 60)), ErrLimit},
		{"too many files", stream(entry(kindFile, "a", 0, 0), entry(kindFile, "b", 0, 0), entry(kindFile, "c", 0, 0)), ErrLimit},
		{"duplicate", stream(entry(kindFile, "a", 0, 0), entry(kindFile, "a", 0, 0)), ErrFormat},
		{"stops mid-file", stream(entry(kindFile, "a", 0o600, 50), make([]byte, 10)), io.ErrUnexpectedEOF},
		{"end count wrong", stream(entry(kindFile, "a", 0, 0), entry(kindEnd, "", 0, 2)), ErrFormat},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Receive(bytes.NewReader(tt.in), t.TempDir(), lim, nil)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestReceiveRefusesSymlink(t *testing.T) {
	dir, outside := t.TempDir(), t.TempDir()
	target := filepath.Join(outside, "victim")
	if err := os.Symlink(target, filepath.Join(dir, "a")); err != nil {
		t.Fatal(err)
	}
	in := stream(entry(kindFile, "a", 0o600, 1), []byte("x"), entry(kindEnd, "", 0, 1))
	if _, err := Receive(bytes.NewReader(in), dir, DefaultLimits(), nil); err == nil {
		t.Fatal("wrote through a symlink")
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("file outside the dir exists: %v", err)
	}
}

func FuzzReceive(f *testing.F) {
	f.Add(stream(entry(kindFile, "a", 0o600, 1), []byte("x"), entry(kindEnd, "", 0, 1)))
	f.Add(stream(entry(kindEnd, "", 0, 0)))
	f.Add(stream(entry(kindFile, "../a", 0o600, 1<<62)))
	f.Fuzz(func(t *testing.T, in []byte) {
		dir := t.TempDir()
		got, err := Receive(bytes.NewReader(in), dir, Limits{MaxFiles: 8, MaxFileBytes: 1 << 16, MaxBytes: 1 << 17}, nil)
		if err != nil {
			return
		}
		var buf bytes.Buffer
		sent, err := Send(&buf, dir, nil)
		if err != nil || !Equal(sent, got) {
			t.Fatalf("resend %v: %v", got, err)
		}
	})
}

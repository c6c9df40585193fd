package images

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const (
	magic      = "PHIM"
	version    = 1
	entryLen   = 16
	kindFile   = 1
	kindEnd    = 2
	MaxNameLen = 255
)

var (
	ErrFormat = errors.New("images: malformed stream")
	ErrLimit  = errors.New("images: limit exceeded")
)

// Limits bound what Receive accepts.
type Limits struct {
	MaxFiles     int    // files in one stream
	MaxFileBytes uint64 // one file
	MaxBytes     uint64 // all files
}

// DefaultLimits fit a process tree of some GiB.
func DefaultLimits() Limits {
	return Limits{MaxFiles: 100_000, MaxFileBytes: 64 << 30, MaxBytes: 256 << 30}
}

// File is one transferred file.
type File struct {
	Name string
	Size uint64
}

// Progress is told the bytes moved so far; it may be nil.
type Progress func(bytes uint64)

// Send writes every regular file of dir to w and returns what it sent.
// Subdirectories and other file types are refused: CRIU's images dir holds
// none.
func Send(w io.Writer, dir string, progress Progress) ([]File, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read images dir: %w", err)
	}
	sort.Slice(ents, func(i, j int) bool { return ents[i].Name() < ents[j].Name() })
	bw := bufio.NewWriterSize(w, 256<<10)
	if _, err := bw.WriteString(magic); err != nil {
		return nil, err
	}
	bw.WriteByte(version)
	var sent []File
	var total uint64
	for _, e := range ents {
		if !e.Type().IsRegular() {
			return nil, fmt.Errorf("send %s: not a regular file", e.Name())
		}
		if err := validName(e.Name()); err != nil {
			return nil, fmt.Errorf("send: %w", err)
		}
		n, err := sendFile(bw, filepath.Join(dir, e.Name()), e.Name(), func(n uint64) {
			if progress != nil {
				progress(total + n)
			}
		})
		if err != nil {
			return nil, err
		}
		total += n
		sent = append(sent, File{Name: e.Name(), Size: n})
	}
	var h [entryLen]byte
	h[0] = kindEnd
	binary.BigEndian.PutUint64(h[8:], uint64(len(sent)))
	if _, err := bw.Write(h[:]); err != nil {
		return nil, fmt.Errorf("send end: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	return sent, nil
}

func sendFile(w io.Writer, path, name string, progress Progress) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("send %s: %w", name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("send %s: %w", name, err)
	}
	size := uint64(st.Size())
	var h [entryLen]byte
	h[0] = kindFile
	binary.BigEndian.PutUint16(h[2:], uint16(len(name)))
	binary.BigEndian.PutUint32(h[4:], uint32(st.Mode().Perm()))
	binary.BigEndian.PutUint64(h[8:], size)
	if _, err := w.Write(h[:]); err != nil {
		return 0, fmt.Errorf("send %s: %w", name, err)
	}
	if _, err := io.WriteString(w, name); err != nil {
		return 0, fmt.Errorf("send %s: %w", name, err)
	}
	pw := &progressWriter{w: w, fn: progress}
	// Exactly size bytes: a file that changes under us must not desync
	// the stream.
	n, err := io.Copy(pw, io.LimitReader(f, int64(size)))
	if err != nil {
		return 0, fmt.Errorf("send %s: %w", name, err)
	}
	if uint64(n) != size {
		return 0, fmt.Errorf("send %s: shrank from %d to %d bytes while sending", name, size, n)
	}
	return size, nil
}

type progressWriter struct {
	w  io.Writer
	n  uint64
	fn Progress
}

func (p *progressWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.n += uint64(n)
	if p.fn != nil {
		p.fn(p.n)
	}
	return n, err
}

func validName(name string) error {
	switch {
	case name == "", name == ".", name == "..":
		return fmt.Errorf("%w: bad file name %q", ErrFormat, name)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: file name of %d bytes", ErrFormat, len(name))
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("%w: bad file name %q", ErrFormat, name)
	}
	return nil
}

// Receive reads a stream into dir, which must exist and be owned by the
// caller: files are created O_EXCL|O_NOFOLLOW directly inside it, never
// elsewhere. On error the files already written stay for the caller to
// remove with the directory.
func Receive(r io.Reader, dir string, lim Limits, progress Progress) ([]File, error) {
	br := bufio.NewReaderSize(r, 256<<10)
	var pre [len(magic) + 1]byte
	if _, err := io.ReadFull(br, pre[:]); err != nil {
		return nil, fmt.Errorf("receive header: %w", unexpected(err))
	}
	if string(pre[:4]) != magic {
		return nil, fmt.Errorf("%w: bad magic %q", ErrFormat, pre[:4])
	}
	if pre[4] != version {
		return nil, fmt.Errorf("%w: version %d", ErrFormat, pre[4])
	}
	var got []File
	var total uint64
	seen := make(map[string]bool)
	for {
		var h [entryLen]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return got, fmt.Errorf("receive entry: %w", unexpected(err))
		}
		kind, nameLen := h[0], binary.BigEndian.Uint16(h[2:])
		mode, size := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		if h[1] != 0 {
			return got, fmt.Errorf("%w: reserved byte %d", ErrFormat, h[1])
		}
		switch kind {
		case kindEnd:
			if nameLen != 0 || mode != 0 {
				return got, fmt.Errorf("%w: bad end entry", ErrFormat)
			}
			if size != uint64(len(got)) {
				return got, fmt.Errorf("%w: end says %d files, received %d", ErrFormat, size, len(got))
			}
			return got, nil
		case kindFile:
		default:
			return got, fmt.Errorf("%w: entry kind %d", ErrFormat, kind)
		}
		if len(got) >= lim.MaxFiles {
			return got, fmt.Errorf("%w: more than %d files", ErrLimit, lim.MaxFiles)
		}
		if nameLen == 0 || nameLen > MaxNameLen {
			return got, fmt.Errorf("%w: name length %d", ErrFormat, nameLen)
		}
		if mode > 0o777 {
			return got, fmt.Errorf("%w: mode %o", ErrFormat, mode)
		}
		if size > lim.MaxFileBytes {
			return got, fmt.Errorf("%w: file of %d bytes (max %d)", ErrLimit, size, lim.MaxFileBytes)
		}
		if total+size > lim.MaxBytes {
			return got, fmt.Errorf("%w: more than %d bytes", ErrLimit, lim.MaxBytes)
		}
		nb := make([]byte, nameLen) // bounded by MaxNameLen
		if _, err := io.ReadFull(br, nb); err != nil {
			return got, fmt.Errorf("receive name: %w", unexpected(err))
		}
		name := string(nb)
		if err := validName(name); err != nil {
			return got, err
		}
		if seen[name] {
			return got, fmt.Errorf("%w: %s sent twice", ErrFormat, name)
		}
		seen[name] = true
		base := total
		if err := receiveFile(br, filepath.Join(dir, name), os.FileMode(mode)&0o700|0o600, size, func(n uint64) {
			if progress != nil {
				progress(base + n)
			}
		}); err != nil {
			return got, fmt.Errorf("receive %s: %w", name, err)
		}
		total += size
		got = append(got, File{Name: name, Size: size})
	}
}

func receiveFile(r io.Reader, path string, mode os.FileMode, size uint64, progress Progress) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|noFollow, mode)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	pw := &progressWriter{w: f, fn: progress}
	n, err := io.Copy(pw, io.LimitReader(r, int64(size)))
	if err != nil {
		return err
	}
	if uint64(n) != size {
		return fmt.Errorf("stream ended after %d of %d bytes: %w", n, size, io.ErrUnexpectedEOF)
	}
	return nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Equal reports whether two manifests list the same files and sizes, in any
// order.
func Equal(a, b []File) bool {
	if len(a) != len(b) {
		return false
	}
	m := make(map[string]uint64, len(a))
	for _, f := range a {
		m[f.Name] = f.Size
	}
	for _, f := range b {
		if s, ok := m[f.Name]; !ok || s != f.Size {
			return false
		}
		delete(m, f.Name)
	}
	return len(m) == 0
}

// Total sums the sizes of files.
func Total(files []File) uint64 {
	var t uint64
	for _, f := range files {
		t += f.Size
	}
	return t
}

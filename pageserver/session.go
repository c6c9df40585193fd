package pageserver

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/phaul/phaul/core/pagestore"
)

// readBufferSize is the read buffer for headers; page data larger than it
// is read straight into the page buffer.
const readBufferSize = 64 << 10

// session runs the protocol for one connection (spec.md §3-§6). It is used
// by one goroutine.
type session struct {
	store     Store
	imagesDir string
	r         *bufio.Reader
	w         io.Writer
	buf       []byte // HeaderLen bytes for a GET reply, then pages; at most HeaderLen+MaxPagesPerIOV*PageSize

	cur       pagestore.Key // the open pagemap, if curOpen
	curOpen   bool
	curParent bool // cur has a parent image
	modified  bool // something to commit at CLOSE
	stats     Stats
}

func newSession(srv *Server, rw io.ReadWriter) *session {
	return &session{
		store:     srv.cfg.Store,
		imagesDir: srv.cfg.ImagesDir,
		r:         bufio.NewReaderSize(rw, readBufferSize),
		w:         rw,
	}
}

// readFirst reads a connection's first header under the header-version
// rule (spec.md §2.3): 24 bytes, decide, then the rest.
func (s *session) readFirst() (header, error) {
	var b [HeaderLen]byte
	if _, err := io.ReadFull(s.r, b[:headerLen41]); err != nil {
		return header{}, fmt.Errorf("read first header: %w", err)
	}
	if err := detectVersion((*[headerLen41]byte)(b[:headerLen41])); err != nil {
		return header{}, err
	}
	if _, err := io.ReadFull(s.r, b[headerLen41:]); err != nil {
		return header{}, fmt.Errorf("read first header: %w", err)
	}
	return decodeHeader(&b), nil
}

// readHeader reads the next header. EOF before it means the client left
// without CLOSE.
func (s *session) readHeader() (header, error) {
	var b [HeaderLen]byte
	switch _, err := io.ReadFull(s.r, b[:]); {
	case errors.Is(err, io.EOF):
		return header{}, ErrUnflushed
	case errors.Is(err, io.ErrUnexpectedEOF):
		return header{}, fmt.Errorf("%w: truncated header: %w", ErrUnflushed, err)
	case err != nil:
		return header{}, fmt.Errorf("read header: %w", err)
	}
	return decodeHeader(&b), nil
}

// run handles first and every later request until CLOSE or an error.
func (s *session) run(h header) error {
	for {
		done, err := s.handle(h)
		if err != nil || done {
			return err
		}
		if h, err = s.readHeader(); err != nil {
			return err
		}
	}
}

// handle serves one request; done is true after CLOSE or FORCE_CLOSE.
func (s *session) handle(h header) (done bool, err error) {
	k, err := checkRequest(h)
	if err != nil {
		return false, err
	}
	switch h.cmd {
	case CmdOpen:
		return false, s.open(k)
	case CmdOpen2:
		if err := s.open(k); err != nil {
			return false, err
		}
		var has byte
		if s.curParent {
			has = 1
		}
		return false, s.write([]byte{has})
	case CmdParent:
		has, err := s.parentHas(k)
		if err != nil {
			return false, err
		}
		var v int32
		if has {
			v = 1
		}
		return false, s.writeInt32(v)
	case CmdGet:
		return false, s.get(k, h)
	case CmdClose, CmdForceClose:
		return true, s.close(h.cmd)
	}
	return false, s.add(k, h) // ADD, ADD_F, HOLE
}

// open makes k the open pagemap.
func (s *session) open(k pagestore.Key) error {
	s.curOpen = false
	has, err := s.store.Open(k)
	if err != nil {
		return fmt.Errorf("open %+v: %w", k, err)
	}
	s.cur, s.curOpen, s.curParent, s.modified = k, true, has, true
	return nil
}

// add stores one range, opening its pagemap first if another one is open
// (CRIU's "IO w/o open"). Data is read in full before the store sees any
// of it.
func (s *session) add(k pagestore.Key, h header) error {
	if !s.curOpen || s.cur != k {
		if err := s.open(k); err != nil {
			return err
		}
	}
	flags := h.rangeFlags()
	if flags&FlagParent != 0 && !s.curParent {
		return fmt.Errorf("%w: %v", ErrNoParent, h)
	}
	var data []byte
	if h.hasData() {
		var err error
		if data, err = s.readPages(h.nrPages * PageSize); err != nil { // bounded by checkRequest
			return fmt.Errorf("pages of %v: %w", h, err)
		}
		s.stats.PagesIn += h.nrPages
	}
	if err := s.store.Add(k, h.vaddr, h.nrPages, uint32(flags), data); err != nil {
		return fmt.Errorf("store %v: %w", h, err)
	}
	s.stats.Ranges++
	return nil
}

// readChunk is how much page data is read before the buffer grows: a
// header alone never makes the server allocate more than this.
const readChunk = 1 << 20

// readPages reads n bytes of page data into s.buf after the header space,
// growing the buffer only as the data arrives.
func (s *session) readPages(n uint64) ([]byte, error) {
	for off := uint64(0); off < n; {
		end := min(n, off+readChunk)
		s.grow(end)
		if got, err := io.ReadFull(s.r, s.buf[HeaderLen+off:HeaderLen+end]); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, fmt.Errorf("%w: connection closed after %d of %d bytes: %w", ErrUnflushed, off+uint64(got), n, io.ErrUnexpectedEOF)
			}
			return nil, err
		}
		off = end
	}
	return s.buf[HeaderLen : HeaderLen+n], nil
}

// get answers a GET with the run of stored pages at h.vaddr (spec.md §3.1).
func (s *session) get(k pagestore.Key, h header) error {
	n, err := s.readRun(k, h.vaddr, h.nrPages)
	if err != nil {
		return fmt.Errorf("%v: %w", h, err)
	}
	appendHeader(s.buf[:0], header{cmd: CmdAddF, flags: FlagPresent, nrPages: n, vaddr: h.vaddr, dstID: h.dstID})
	if err := s.write(s.buf[:HeaderLen+n*PageSize]); err != nil {
		return err
	}
	s.stats.Gets++
	s.stats.PagesOut += n
	return nil
}

// readRun reads the longest run of stored pages at vaddr, at most nr of
// them, into s.buf after the header space and returns its length. It reads
// readChunk at a time, so the buffer grows only as far as the run goes.
func (s *session) readRun(k pagestore.Key, vaddr, nr uint64) (uint64, error) {
	var got uint64
	for got < nr {
		n := min(nr-got, readChunk/PageSize)
		s.grow((got + n) * PageSize)
		buf := s.buf[HeaderLen+got*PageSize : HeaderLen+(got+n)*PageSize]
		err := s.store.Read(k, vaddr+got*PageSize, buf)
		if err == nil {
			got += n
			continue
		}
		if !missing(err) {
			return 0, fmt.Errorf("store read: %w", err)
		}
		m, perr := s.readPrefix(k, vaddr+got*PageSize, buf)
		if perr != nil {
			return 0, perr
		}
		if got += m; got == 0 {
			return 0, fmt.Errorf("%w: %w", ErrNotFound, err)
		}
		break
	}
	return got, nil
}

// readPrefix reads the longest stored prefix of buf's pages at vaddr into
// buf, knowing that not all of them are stored, and returns its length.
func (s *session) readPrefix(k pagestore.Key, vaddr uint64, buf []byte) (uint64, error) {
	read := func(n uint64) error { return s.store.Read(k, vaddr, buf[:n*PageSize]) }
	good, bad := uint64(0), uint64(len(buf)/PageSize) // a prefix of a stored run is stored
	for bad-good > 1 {
		mid := good + (bad-good)/2
		switch err := read(mid); {
		case err == nil:
			good = mid
		case missing(err):
			bad = mid
		default:
			return 0, fmt.Errorf("store read: %w", err)
		}
	}
	if good > 0 {
		// The last read may have failed and clobbered the buffer.
		if err := read(good); err != nil {
			return 0, fmt.Errorf("store read: %w", err)
		}
	}
	return good, nil
}

// missing reports whether a store Read failed because a page has no
// content there: never added, or recorded lazy or in the parent.
func missing(err error) bool {
	return errors.Is(err, pagestore.ErrNotFound) || errors.Is(err, pagestore.ErrNoContent)
}

// parentHas reports whether the images dir's parent holds k's pagemap, as
// CRIU's check_parent_local_xfer does.
func (s *session) parentHas(k pagestore.Key) (bool, error) {
	if s.imagesDir == "" {
		return false, nil
	}
	name := fmt.Sprintf("pagemap-%d.img", k.ID)
	if k.Kind == pagestore.KindShmem {
		name = fmt.Sprintf("pagemap-shmem-%d.img", k.ID)
	}
	fi, err := os.Stat(filepath.Join(s.imagesDir, "parent", name))
	switch {
	case err == nil:
		return fi.Mode().IsRegular(), nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("parent check: %w", err)
}

// close ends the session: commit if anything changed, reply the status,
// and after CLOSE wait for the client's EOF.
func (s *session) close(cmd Command) error {
	status := statusOK
	var commitErr error
	if s.modified {
		if commitErr = s.store.Commit(); commitErr != nil {
			status = statusFailed
			commitErr = fmt.Errorf("commit: %w", commitErr)
		} else {
			s.stats.Committed = true
			s.modified = false
		}
	}
	if err := s.writeInt32(status); err != nil {
		return errors.Join(commitErr, err)
	}
	if commitErr != nil || cmd == CmdForceClose {
		return commitErr
	}
	// CRIU's server waits for the client to close first, so TIME_WAIT
	// stays with the client.
	var b [1]byte
	if n, _ := s.r.Read(b[:]); n > 0 {
		return fmt.Errorf("%w: data after CLOSE", ErrHeader)
	}
	return nil
}

// grow makes s.buf hold HeaderLen+n bytes, keeping its content; n is at
// most MaxPagesPerIOV*PageSize.
func (s *session) grow(n uint64) {
	need := HeaderLen + n
	if uint64(len(s.buf)) >= need {
		return
	}
	b := make([]byte, max(need, min(2*uint64(len(s.buf)), HeaderLen+MaxPagesPerIOV*PageSize)))
	copy(b, s.buf)
	s.buf = b
}

func (s *session) writeInt32(v int32) error {
	return s.write(binary.LittleEndian.AppendUint32(nil, uint32(v)))
}

func (s *session) write(b []byte) error {
	if _, err := s.w.Write(b); err != nil {
		return fmt.Errorf("reply: %w", err)
	}
	return nil
}

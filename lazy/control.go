package lazy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/phaul/phaul/core/linux"
)

// CRIU's restore speaks on lazy-pages.socket (criu/uffd.c, send_uffd and
// lazy_pages_finish_restore), in host order (little-endian on amd64):
//
//	per task:  int32 vpid; for vpid > 0 then 1 byte carrying the task's
//	           userfaultfd (SCM_RIGHTS); -vpid for a zombie, no descriptor
//	once:      uint32 finishWord, after every task is restored
//
// and then closes the socket when it exits.
const (
	finishWord uint32 = 0x52535446 // LAZY_PAGES_RESTORE_FINISHED
	// maxPid is PID_MAX_LIMIT (4194304): every vpid is at most this, and
	// finishWord is above it, so a word is never both.
	maxPid = 1 << 22
)

type recordKind uint8

const (
	recTask   recordKind = iota + 1 // a task and its userfaultfd
	recZombie                       // a zombie: no memory, no descriptor
	recFinish                       // the restore is done
)

// record is one message of the restore.
type record struct {
	kind recordKind
	pid  int32    // the vpid, positive also for a zombie
	uffd *os.File // recTask: owned by the receiver of the record
}

// recvFunc reads bytes and the descriptors that came with them, as
// linux.RecvFDs does; the files are the caller's.
type recvFunc func(b []byte) (int, []*os.File, error)

// recordReader decodes the restore's messages. It reads exactly the bytes
// of each part, so a descriptor is only ever taken with the byte it was
// sent with.
type recordReader struct {
	recv     recvFunc
	finished bool // finishWord was read
}

// next returns the next record: io.EOF at a clean end between records,
// errors wrapping ErrProtocol for a violation.
func (r *recordReader) next() (record, error) {
	var w [4]byte
	if err := r.full(w[:]); err != nil {
		return record{}, err
	}
	v := binary.LittleEndian.Uint32(w[:])
	if r.finished {
		return record{}, fmt.Errorf("%w: word %#x after the finish marker", ErrProtocol, v)
	}
	pid := int32(v)
	switch {
	case v == finishWord:
		r.finished = true
		return record{kind: recFinish}, nil
	case pid == 0 || pid > maxPid || pid < -maxPid:
		return record{}, fmt.Errorf("%w: pid record %#x", ErrProtocol, v)
	case pid < 0:
		return record{kind: recZombie, pid: -pid}, nil
	}
	var b [1]byte
	n, files, err := r.recv(b[:])
	if n == 0 && err == nil {
		err = io.ErrUnexpectedEOF
	}
	if err == nil && len(files) != 1 {
		err = fmt.Errorf("%w: task %d: %d descriptors, want 1", ErrProtocol, pid, len(files))
	}
	if err != nil {
		closeAll(files)
		return record{}, fmt.Errorf("task %d: userfaultfd: %w", pid, unexpected(err))
	}
	return record{kind: recTask, pid: pid, uffd: files[0]}, nil
}

// full fills b, refusing descriptors: none are sent with these bytes.
func (r *recordReader) full(b []byte) error {
	for got := 0; got < len(b); {
		n, files, err := r.recv(b[got:])
		if len(files) > 0 {
			closeAll(files)
			return fmt.Errorf("%w: descriptor with a %d-byte word", ErrProtocol, len(b))
		}
		got += n
		if got == len(b) {
			return nil
		}
		if err == nil && n == 0 {
			err = io.EOF // a stream read of 0 bytes is its end
		}
		if err != nil && got > 0 {
			return unexpected(err)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// ctrl is what the control reader hands the loop, in the restore's order:
// a task, a zombie or the finish marker.
type ctrl struct {
	task   *task // a task with its ranges; nil for the others
	zombie bool
	finish bool
}

// control reads the restore's records until the socket ends, loading each
// task's lazy ranges before handing it to the loop. It returns nil at EOF
// after the finish marker and when ctx ends (its closer closed conn).
func (d *Daemon) control(ctx context.Context, conn *net.UnixConn, out chan<- ctrl) error {
	rr := recordReader{recv: func(b []byte) (int, []*os.File, error) { return linux.RecvFDs(conn, b) }}
	for {
		rec, err := rr.next()
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, io.EOF) && rr.finished:
			return nil
		case errors.Is(err, syscall.ECONNRESET) && rr.finished:
			// The restore closed its end with the descriptor Park
			// queued there unread: the kernel reports a reset, not EOF.
			return nil
		case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
			return ErrRestoreEnded
		case errors.Is(err, ErrProtocol):
			return err
		default:
			return fmt.Errorf("lazy: restore socket: %w", err)
		}
		var m ctrl
		switch rec.kind {
		case recZombie:
			d.log.Debug("zombie", "pid", rec.pid)
			m.zombie = true
		case recFinish:
			m.finish = true
		case recTask:
			t, err := d.newTask(rec)
			if err != nil {
				return err
			}
			m.task = t
		}
		select {
		case out <- m:
		case <-ctx.Done():
			if m.task != nil {
				m.task.uffd.Close()
			}
			return nil
		}
	}
}

// newTask reads the lazy ranges of a restored task; it owns rec.uffd.
func (d *Daemon) newTask(rec record) (*task, error) {
	uffd := linux.NewUffd(rec.uffd)
	pend, err := readTaskRanges(d.cfg.ImagesDir, uint64(rec.pid))
	if err != nil {
		uffd.Close()
		return nil, fmt.Errorf("lazy: task %d: %w", rec.pid, err)
	}
	return newTask(fmt.Sprint(rec.pid), uint64(rec.pid), uffd, pend), nil
}

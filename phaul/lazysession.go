package phaul

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/pageserver"
)

// lazySession is phaul's end of the page-server session of CRIU's lazy
// dump. CRIU holds the frozen tree until the session ends: CLOSE kills
// the tree, a command CRIU rejects resumes it (docs/protocol.md §8).
//
// CRIU gets the other end of a socket pair when it starts (no listener
// another local process could reach first) and a copy of this end, which
// it never uses: so phaul's death is no EOF, which CRIU would take for a
// clean end and kill a tree whose destination may still lack its pages.
// A dead phaul leaves CRIU holding the tree frozen; the journal names
// CRIU, and the next phaul resolves it (recover.go).
type lazySession struct {
	conn    net.Conn
	criuEnd *os.File // CRIU's end, inherited as its --ps-socket
	peer    *os.File // a copy of conn for CRIU to inherit
	once    sync.Once
	done    chan error
}

func newLazySession() (*lazySession, error) {
	conn, criuEnd, err := linux.StreamPair()
	if err != nil {
		return nil, fmt.Errorf("lazy dump session: %w", err)
	}
	peer, err := conn.(interface{ File() (*os.File, error) }).File()
	if err != nil {
		conn.Close()
		criuEnd.Close()
		return nil, fmt.Errorf("lazy dump session: %w", err)
	}
	return &lazySession{conn: conn, criuEnd: criuEnd, peer: peer, done: make(chan error, 1)}, nil
}

// started drops phaul's copies of the files CRIU inherited.
func (l *lazySession) started() {
	l.criuEnd.Close()
	l.peer.Close()
}

// rejectCommand is no page-server command: CRIU answers it by ending the
// session with an error, and resumes the tree.
const rejectCommand = 0xdead

// end ends the session cleanly (CLOSE), which kills the tree. wait
// collects CRIU's answer.
func (l *lazySession) end() { l.send(pageserver.CmdClose) }

// reject ends the session with a command CRIU rejects: the tree resumes.
func (l *lazySession) reject() { l.send(rejectCommand) }

// send writes cmd's header once (the first of end or reject wins) and
// reads CRIU's answer in the background: the CLOSE status, or EOF once
// CRIU has exited (CRIU's copy of this end closes with it).
func (l *lazySession) send(cmd pageserver.Command) {
	l.once.Do(func() {
		go func() { // owned by l; wait collects it
			l.conn.SetDeadline(time.Now().Add(time.Minute))
			_, err := l.conn.Write(pageserver.AppendCommand(nil, cmd))
			if err == nil && cmd == pageserver.CmdClose {
				var status [4]byte
				if _, err = io.ReadFull(l.conn, status[:]); err == nil {
					if st := int32(binary.NativeEndian.Uint32(status[:])); st != 0 {
						err = fmt.Errorf("CRIU answered CLOSE with %d", st)
					}
				}
			}
			err = errors.Join(err, l.conn.Close())
			if cmd != pageserver.CmdClose {
				// Rejected or gone: CRIU resumes the tree either way
				// (or already has); its dump's result says more.
				err = nil
			}
			l.done <- err
		}()
	})
}

// wait returns how the session ended; a session never ended is rejected
// (the tree resumes).
func (l *lazySession) wait() error {
	l.reject()
	if err := <-l.done; err != nil {
		return fmt.Errorf("end the lazy dump: %w", err)
	}
	return nil
}

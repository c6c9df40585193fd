package phaul

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/phaul/phaul/lazy"
)

// The lazy-pages helper's control protocol (lazyhelper.go). The helper
// listens on lazyCtlSocket in the migration's directory (0700, root's:
// only root reaches it); a service opens one connection per thing it
// carries (no multiplexing: relayed pages cross with one copy each way),
// and the connection's first byte says what that is:
//
//	'c'  one request, one JSON line; one reply, one JSON line; closed
//	'f'  then one byte, the pageserver.FetchRole: the destination's end
//	     of a fetch stream the service relays to and from the source
//
// Requests: park (lazy.Daemon.Park), status (the result if the daemon
// ended, without waiting), wait (until it ends), detach (lazy.Daemon.Detach,
// then wait at most timeout_ms). A service that dies leaves the helper
// running with the tree's userfaultfds; the next one connects again.

const (
	lazyCtlSocket  = "lazy-ctl.socket"
	lazyResultFile = "lazy-result.json" // the helper's result, once it ended
	lazyLogFile    = "lazy-pages.log"

	streamControl = 'c'
	streamFetch   = 'f'

	maxLazyRequest = 1 << 10
	maxLazyReply   = 1 << 16
)

// lazyRequest is one control request.
type lazyRequest struct {
	Op        string `json:"op"`
	TimeoutMS int64  `json:"timeout_ms,omitempty"`
	// Root (park) is the restored tree's root: a helper whose daemon
	// failed exits once the tree is gone.
	Root int `json:"root,omitempty"`
}

var lazyOps = map[string]bool{"park": true, "status": true, "wait": true, "detach": true}

// lazyReply answers it. Ended says the daemon's Serve returned, Err what it
// returned (or why the request failed).
type lazyReply struct {
	Err         string     `json:"err,omitempty"`
	Ended       bool       `json:"ended,omitempty"`
	Stats       lazy.Stats `json:"stats"`
	RemotePages uint64     `json:"remote_pages,omitempty"`
}

func (r lazyReply) error() error {
	if r.Err == "" {
		return nil
	}
	return errors.New(r.Err)
}

// readJSONLine decodes one line of at most max bytes into v.
func readJSONLine(r io.Reader, max int, v any) error {
	line, err := bufio.NewReaderSize(io.LimitReader(r, int64(max)), 512).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("lazy control: %w", err)
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("lazy control: %w", err)
	}
	return nil
}

func writeJSONLine(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// decodeLazyRequest reads and checks one request.
func decodeLazyRequest(r io.Reader) (lazyRequest, error) {
	var q lazyRequest
	if err := readJSONLine(r, maxLazyRequest, &q); err != nil {
		return q, err
	}
	if !lazyOps[q.Op] {
		return q, fmt.Errorf("lazy control: unknown op %q", q.Op)
	}
	if q.Root < 0 || q.TimeoutMS < 0 || time.Duration(q.TimeoutMS) > time.Duration(1<<62)/time.Millisecond {
		return q, fmt.Errorf("lazy control: timeout %d ms out of range", q.TimeoutMS)
	}
	return q, nil
}

package criu

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
)

// MaxLogLines bounds Error.LogTail.
const MaxLogLines = 20

// ErrNotFound is wrapped by Locate when no CRIU binary can be found.
var ErrNotFound = errors.New("criu: not found")

// ErrTooOld is wrapped by Locate when CRIU is older than MinVersion.
var ErrTooOld = errors.New("criu: version too old")

// Error reports a failed CRIU action. LogTail holds at most MaxLogLines
// lines from the end of that action's CRIU log.
type Error struct {
	Action   string // "dump", "restore", "check", "version"
	ExitCode int    // -1 if CRIU did not exit (only the RPC failed) or was killed
	Errno    int    // cr_errno from the RPC response, 0 if none
	Message  string // cr_errmsg from the RPC response
	LogTail  []string
	Err      error // cause: *exec.ExitError, socket error, notifier error, ...
}

func (e *Error) Error() string {
	s := fmt.Sprintf("criu %s: exit %d", e.Action, e.ExitCode)
	if e.Errno != 0 {
		s += fmt.Sprintf(", errno %d", e.Errno)
	}
	switch {
	case e.Err != nil:
		s += ": " + e.Err.Error()
	case e.Message != "":
		s += ": " + e.Message
	}
	if line := e.lastErrorLine(); line != "" {
		s += ": " + line
	}
	return s
}

// lastErrorLine picks the most telling log line: the last one CRIU marked as
// an error, else the last line.
func (e *Error) lastErrorLine() string {
	for i := len(e.LogTail) - 1; i >= 0; i-- {
		if strings.Contains(e.LogTail[i], "Error") {
			return strings.TrimSpace(e.LogTail[i])
		}
	}
	if n := len(e.LogTail); n > 0 {
		return strings.TrimSpace(e.LogTail[n-1])
	}
	return ""
}

func (e *Error) Unwrap() error { return e.Err }

// tailFile returns at most n lines from the end of the file at path.
// A missing file yields nil.
func tailFile(path string, n int) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	// Logs at -v4 can be large: read only the last 64 KiB.
	const window = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > window {
		if _, err := f.Seek(st.Size()-window, 0); err != nil {
			return nil
		}
	}
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), window)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return lines
}

// ringBuffer keeps the last max bytes written to it, for CRIU's stderr.
type ringBuffer struct {
	max int
	buf []byte
}

func (r *ringBuffer) Write(p []byte) (int, error) {
	r.buf = append(r.buf, p...)
	if over := len(r.buf) - r.max; over > 0 {
		r.buf = r.buf[over:]
	}
	return len(p), nil
}

func (r *ringBuffer) lines(n int) []string {
	s := strings.TrimSpace(string(r.buf))
	if s == "" {
		return nil
	}
	ls := strings.Split(s, "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return ls
}

package criu

import (
	"bufio"
	"errors"
	"fmt"
	"io"
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
	Cause    string // the first error line of the log that is not noise
	LogTail  []string
	Err      error // cause: *exec.ExitError, socket error, notifier error, ...
}

func (e *Error) Error() string {
	s := fmt.Sprintf("criu %s: exit %d", e.Action, e.ExitCode)
	if e.Errno != 0 {
		s += fmt.Sprintf(", errno %d", e.Errno)
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	var ne *notifyError
	switch {
	case errors.As(e.Err, &ne):
		// phaul failed the script on purpose; CRIU's log only echoes that.
	case e.Cause != "":
		s += ": " + e.Cause
	case e.Message != "" && !isNoise(e.Message):
		s += ": " + e.Message
	case e.Err == nil:
		if n := len(e.LogTail); n > 0 {
			s += ": " + e.LogTail[n-1]
		}
	}
	// One line: callers print it as the command's error.
	return strings.Join(strings.Fields(s), " ")
}

// isNoise reports error lines CRIU prints on every run here, or that only
// say that an action failed without saying why.
func isNoise(line string) bool {
	for _, n := range []string{"Can't setup RLIMIT_NOFILE", "Dumping FAILED", "Restoring FAILED",
		"Pre-dumping FAILED", "Lazy pages transfer FAILED"} {
		if strings.Contains(line, n) {
			return true
		}
	}
	return false
}

// firstError returns the first "Error (" line of a CRIU log that is not
// noise, without its timestamp, or "".
func firstError(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 256<<20))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		i := strings.Index(line, "Error (")
		if i < 0 || isNoise(line) {
			continue
		}
		return strings.TrimSpace(line[i:])
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

package criu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/checkpoint-restore/go-criu/v8/rpc"

	"github.com/phaul/phaul/core/linux"
)

// maxPacket bounds one CriuResp packet. CRIU's replies are small; a packet
// that fills the buffer is reported as truncated rather than misparsed.
const maxPacket = 1 << 20

// Notifier receives CRIU's notify scripts during dump and restore. Script
// names are CRIU's ("pre-dump", "post-dump", "post-restore", ...); pid is set
// for the scripts that carry one. A non-nil error fails the script: for
// post-dump CRIU then unlocks the network and resumes the tree.
type Notifier interface {
	Notify(ctx context.Context, script string, pid int32) error
}

// NotifyFunc adapts a function to Notifier.
type NotifyFunc func(ctx context.Context, script string, pid int32) error

// Notify calls f.
func (f NotifyFunc) Notify(ctx context.Context, script string, pid int32) error {
	return f(ctx, script, pid)
}

// swrk is one running `criu swrk 3` child and its RPC socket.
type swrk struct {
	action string
	cmd    *exec.Cmd
	conn   *net.UnixConn
	stderr *ringBuffer
	log    *slog.Logger
	buf    []byte
}

// Hooks customise how the CRIU child starts.
type Hooks struct {
	// Started, if set, runs after CRIU started and before the first request:
	// the place to move the child into cgroups before it forks anything.
	Started func(pid int) error
	// ExtraFiles are inherited by CRIU as fds 4, 5, ... (fd 3 is the RPC
	// socket); requests refer to them by those numbers.
	ExtraFiles []*os.File
	// KeepPeer has CRIU inherit a copy of phaul's own end of the RPC
	// socket (after ExtraFiles), so that CRIU never reads EOF: a pending
	// notification stays pending if phaul exits or closes its end, and
	// only an explicit answer (or killing CRIU) ends it. A destination
	// holds a restored tree in post-restore this way; whoever takes
	// phaul's place later can answer through that copy (pidfd_getfd).
	// Without it, closing the socket fails a pending script.
	KeepPeer bool
}

// PeerFD is the descriptor number of phaul's end of the RPC socket in a
// CRIU child started with KeepPeer: it follows fd 3 and ExtraFiles.
func (h Hooks) PeerFD() int { return 4 + len(h.ExtraFiles) }

func (b *Binary) start(ctx context.Context, action string, hooks Hooks, log *slog.Logger) (*swrk, error) {
	local, remote, err := linux.SeqpacketPair()
	if err != nil {
		return nil, &Error{Action: action, ExitCode: -1, Err: err}
	}
	defer remote.Close()
	cmd := exec.CommandContext(ctx, b.Path, "swrk", "3")
	cmd.ExtraFiles = append([]*os.File{remote}, hooks.ExtraFiles...) // RPC socket is fd 3 in the child
	if hooks.KeepPeer {
		own, err := local.File()
		if err != nil {
			local.Close()
			return nil, &Error{Action: action, ExitCode: -1, Err: fmt.Errorf("keep peer: %w", err)}
		}
		defer own.Close()
		cmd.ExtraFiles = append(cmd.ExtraFiles, own)
	}
	errTail := &ringBuffer{max: 8 << 10}
	cmd.Stdout = errTail
	cmd.Stderr = errTail
	// CRIU must survive in its own process group so a terminal's ^C reaches
	// phaul, which then rolls back through the RPC instead of killing CRIU
	// mid-dump.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		local.Close()
		return nil, &Error{Action: action, ExitCode: -1, Err: fmt.Errorf("start %s: %w", b.Path, err)}
	}
	s := &swrk{action: action, cmd: cmd, conn: local, stderr: errTail, log: log, buf: make([]byte, maxPacket)}
	if hooks.Started != nil {
		if err := hooks.Started(cmd.Process.Pid); err != nil {
			s.kill()
			return nil, &Error{Action: action, ExitCode: -1, Err: err}
		}
	}
	return s, nil
}

func (s *swrk) send(req *rpc.CriuReq) error {
	b, err := req.MarshalVT()
	if err != nil {
		return fmt.Errorf("marshal %v request: %w", req.GetType(), err)
	}
	if _, err := s.conn.Write(b); err != nil {
		return fmt.Errorf("send %v request: %w", req.GetType(), err)
	}
	return nil
}

func (s *swrk) recv() (*rpc.CriuResp, error) {
	n, _, flags, _, err := s.conn.ReadMsgUnix(s.buf, nil)
	if err != nil {
		return nil, fmt.Errorf("read response: %w", err)
	}
	if n == 0 {
		return nil, fmt.Errorf("read response: criu closed the socket")
	}
	if flags&syscall.MSG_TRUNC != 0 {
		return nil, fmt.Errorf("read response: packet larger than %d bytes", maxPacket)
	}
	resp := &rpc.CriuResp{}
	if err := resp.UnmarshalVT(s.buf[:n]); err != nil {
		return nil, fmt.Errorf("decode response: %w", err)
	}
	return resp, nil
}

// call sends req and serves notifications until the final response.
func (s *swrk) call(ctx context.Context, req *rpc.CriuReq, n Notifier) (*rpc.CriuResp, error) {
	if err := s.send(req); err != nil {
		return nil, err
	}
	// Reads block in the poller; closing the socket when ctx ends unblocks
	// them, and CRIU sees EOF, which fails any pending script.
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	defer stop()
	for {
		resp, err := s.recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			return nil, err
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			if resp.GetType() != req.GetType() {
				return resp, fmt.Errorf("unexpected %v response to %v", resp.GetType(), req.GetType())
			}
			return resp, nil
		}
		script := resp.GetNotify().GetScript()
		ok := true
		var nerr error
		if n != nil {
			start := time.Now()
			nerr = n.Notify(ctx, script, resp.GetNotify().GetPid())
			ok = nerr == nil
			s.log.Debug("criu notify", "script", script, "ok", ok, "dur", time.Since(start))
		}
		ack := &rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: &ok}
		if err := s.send(ack); err != nil {
			if ctx.Err() != nil {
				// The socket was closed on purpose: CRIU saw EOF, which
				// fails the script and rolls back.
				return nil, fmt.Errorf("%s script interrupted: %w", script, context.Cause(ctx))
			}
			return nil, fmt.Errorf("ack %s: %w", script, err)
		}
		if nerr != nil {
			// CRIU rolls back now; keep reading for its final answer, but
			// remember why.
			resp, err := s.drain(ctx, req.GetType())
			if err == nil && resp.GetSuccess() {
				return resp, fmt.Errorf("criu ignored failed %s script: %w", script, nerr)
			}
			return resp, &notifyError{script: script, err: nerr}
		}
	}
}

// drain reads until the final response after a failed script, acking any
// further notification with failure.
func (s *swrk) drain(ctx context.Context, typ rpc.CriuReqType) (*rpc.CriuResp, error) {
	for {
		resp, err := s.recv()
		if err != nil {
			return nil, err
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			return resp, nil
		}
		ok := false
		if err := s.send(&rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: &ok}); err != nil {
			return nil, err
		}
	}
}

// notifyError marks a failure that phaul's own notifier asked for.
type notifyError struct {
	script string
	err    error
}

func (e *notifyError) Error() string { return fmt.Sprintf("%s script failed: %v", e.script, e.err) }
func (e *notifyError) Unwrap() error { return e.err }

// finish closes the socket and waits for CRIU to exit; it returns CRIU's exit
// code (-1 when killed or not known).
func (s *swrk) finish() (int, error) {
	s.conn.Close()
	err := s.cmd.Wait()
	code := -1
	if s.cmd.ProcessState != nil {
		code = s.cmd.ProcessState.ExitCode()
	}
	return code, err
}

func (s *swrk) kill() {
	s.cmd.Process.Kill()
	s.finish()
}

// fail builds the Error for a failed action, reading the log tail from
// logPath (if any) or else CRIU's stderr.
func (s *swrk) fail(resp *rpc.CriuResp, cause error, logPath string) *Error {
	code, werr := s.finish()
	e := &Error{Action: s.action, ExitCode: code, Err: cause}
	if resp != nil {
		e.Errno = int(resp.GetCrErrno())
		e.Message = resp.GetCrErrmsg()
	}
	if e.Err == nil && e.Message == "" && werr != nil {
		var ee *exec.ExitError
		if !errors.As(werr, &ee) {
			e.Err = werr
		}
	}
	if logPath != "" {
		e.LogTail = tailFile(logPath, MaxLogLines)
		e.Cause = firstError(logPath)
	}
	if len(e.LogTail) == 0 {
		e.LogTail = s.stderr.lines(MaxLogLines)
		if n := len(e.LogTail); n > 0 && e.Cause == "" {
			e.Cause = e.LogTail[n-1] // CRIU died before it had a log
		}
	}
	return e
}

// logPath is where CRIU writes the log named name inside workDir.
func logPath(workDir, name string) string {
	if workDir == "" || name == "" {
		return ""
	}
	return filepath.Join(workDir, name)
}

package criu

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/checkpoint-restore/go-criu/v8/rpc"

	"github.com/phaul/phaul/core/linux"
)

// AnswerHeld answers the notification a CRIU started with Hooks.KeepPeer
// holds a restore in (post-restore: the tree rebuilt, never run), from
// any process: through fd, CRIU's own copy of its RPC peer's end, taken
// with pidfd_getfd. resume answers with success (CRIU resumes the tree),
// otherwise with failure (CRIU kills it). The notifications that follow a
// resume (pre-resume, post-resume) are answered with success. It returns
// CRIU's final response to the restore request.
func AnswerHeld(pid, fd int, resume bool, timeout time.Duration) (*rpc.CriuResp, error) {
	p, err := linux.PidfdOpen(pid)
	if err != nil {
		return nil, fmt.Errorf("held restore: criu %d: %w", pid, err)
	}
	defer p.Close()
	f, err := p.Getfd(fd)
	if err != nil {
		return nil, fmt.Errorf("held restore: criu %d: %w", pid, err)
	}
	c, err := net.FileConn(f) // a dup in the poller, for the deadline
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("held restore: criu %d fd %d: %w", pid, fd, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	buf := make([]byte, maxPacket)
	for ok := resume; ; ok = true {
		b, err := (&rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: &ok}).MarshalVT()
		if err != nil {
			return nil, err
		}
		if _, err := c.Write(b); err != nil {
			return nil, fmt.Errorf("held restore: answer criu %d: %w", pid, err)
		}
		n, err := c.Read(buf) // one message: the socket is SOCK_SEQPACKET
		if err != nil {
			return nil, fmt.Errorf("held restore: read criu %d: %w", pid, err)
		}
		resp := &rpc.CriuResp{}
		if err := resp.UnmarshalVT(buf[:n]); err != nil {
			return nil, fmt.Errorf("held restore: criu %d: %w", pid, err)
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			if resp.GetType() != rpc.CriuReqType_RESTORE {
				return resp, errors.New("held restore: criu answered " + resp.GetType().String())
			}
			return resp, nil
		}
	}
}

package phaul

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/linux"
)

// errRestoreAborted is what the destination answers CRIU's post-restore
// notification with when the migration is aborted: CRIU then kills the
// tree it rebuilt.
var errRestoreAborted = errors.New("migration aborted: drop the restored tree")

// heldRestore is a CRIU restore that stops in its post-restore
// notification: the tree is rebuilt, every task waits inside CRIU's
// restorer and none has run. Resume answers the notification with success
// and CRIU resumes every task in the state it was dumped in (a stopped
// task stays stopped, no signal is added); Kill answers with failure and
// CRIU kills the tree. CRIU keeps a copy of phaul's end of the RPC socket
// (criu.Hooks.KeepPeer): if phaul exits while the restore is held, the
// tree stays held, not killed, as a migration in doubt must.
type heldRestore struct {
	criuPID int // set by the start hook before the restore request
	peerFD  int // CRIU's copy of phaul's RPC end, in CRIU's fd table
	reached chan int
	decide  chan bool
	done    chan error // Restore's result; buffered, read once
}

// startRestore runs req in the background. The restore is killed if ctx
// ends or timeout passes before the post-restore notification; once the
// tree is held only Resume and Kill end it.
func startRestore(ctx context.Context, bin *criu.Binary, req criu.RestoreRequest, timeout time.Duration) *heldRestore {
	h := &heldRestore{reached: make(chan int, 1), decide: make(chan bool, 1), done: make(chan error, 1)}
	rctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	started := req.Hooks.Started
	req.Hooks.Started = func(pid int) error {
		h.criuPID = pid
		if started != nil {
			return started(pid)
		}
		return nil
	}
	req.Hooks.KeepPeer = true
	h.peerFD = req.Hooks.PeerFD()
	// Until the hold, the caller's context and the timeout bound the
	// restore; after it, nothing but a decision does.
	held := make(chan struct{})
	closeHeld := sync.OnceFunc(func() { close(held) })
	go func() {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-held:
		case <-ctx.Done():
			cancel(context.Cause(ctx))
		case <-t.C:
			cancel(fmt.Errorf("restore took longer than %v", timeout))
		}
	}()
	go func() {
		n := criu.NotifyFunc(func(_ context.Context, script string, pid int32) error {
			if script != "post-restore" {
				return nil
			}
			closeHeld()
			h.reached <- int(pid)
			if <-h.decide {
				return nil
			}
			return errRestoreAborted
		})
		_, err := bin.Restore(rctx, req, n)
		closeHeld()
		cancel(nil)
		h.done <- err
	}()
	return h
}

// wait returns the restored root's pid once the tree is held, or the
// restore's error if it ended first.
func (h *heldRestore) wait() (int, error) {
	select {
	case pid := <-h.reached:
		return pid, nil
	case err := <-h.done:
		if err == nil {
			err = errors.New("restore ended without a post-restore notification")
		}
		return 0, err
	}
}

// gone reports, without waiting, whether CRIU has ended (or is dead and
// not yet reaped): the tree it held can then never resume.
func (h *heldRestore) gone() error {
	if err, ended := peek(h.done); ended {
		if err == nil {
			err = errors.New("criu ended")
		}
		return err
	}
	if st, err := linux.ReadProcessStat(h.criuPID); err != nil || st.State == 'Z' || st.State == 'X' {
		return fmt.Errorf("criu %d is dead", h.criuPID)
	}
	return nil
}

// Resume lets CRIU resume the held tree and waits for CRIU's answer.
func (h *heldRestore) Resume() error {
	h.decide <- true
	return <-h.done
}

// Kill has CRIU kill the held tree and waits for CRIU to end.
func (h *heldRestore) Kill() {
	h.decide <- false
	<-h.done
}

// What an in-doubt tree's memory is (the state file's memory=).
const (
	memoryComplete   = "complete"   // it may resume: nothing is missing
	memoryFilling    = "filling"    // a lazy restore's fill is under way
	memoryIncomplete = "incomplete" // pages are missing: CRIU kills it at resume
)

// record writes the in-doubt state of a held tree to <dir>/state,
// atomically: `in-doubt pid=… criu=… criu_rpc_fd=… cgroup=… memory=…
// reason=…`. A failure is logged: the log line says it all too.
func (h *heldRestore) record(in *incoming, why error, memory string) {
	state := fmt.Sprintf("in-doubt pid=%d criu=%d criu_rpc_fd=%d cgroup=%s/%s memory=%s reason=%q\n",
		in.pid, h.criuPID, h.peerFD, cgroup.Parent, in.id, memory, why.Error())
	if err := writeAtomic(filepath.Join(in.dir, "state"), []byte(state)); err != nil {
		in.log.Error("record in-doubt state", "err", err)
	}
	if err := in.j.record(func(e *JournalEntry) { e.Memory = memory }); err != nil {
		in.log.Error("journal", "err", err)
	}
}

// peek returns, without waiting, the result a one-slot channel holds, and
// leaves it there for its reader; ok is false while there is none.
func peek(ch chan error) (err error, ok bool) {
	select {
	case err = <-ch:
		ch <- err
		return err, true
	default:
		return nil, false
	}
}

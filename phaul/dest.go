package phaul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
)

// incoming is one migration being received.
type incoming struct {
	id    string
	dir   string // WorkDir/<id>; removed unless the tree runs or is in doubt
	log   *slog.Logger
	sess  *transport.Session
	ctl   *wire.Conn
	opts  criu.Options
	group *cgroup.Group // phaul/<id>: CRIU and the tree it restores until COMMIT
	// limits is phaul/<id>-limits in the pids and memory hierarchies,
	// when the restore policy caps the tree: it stays there.
	limits *cgroup.Group
	hold   *heldRestore // the restore, held in post-restore until COMMIT
	lazy   *lazyRestore // its lazy-pages daemon; nil: the restore writes all memory
	// postcopy: the tree resumes before its memory arrived; fetch is the
	// source's end of the fetch streams it asks for the rest on.
	mode     Mode
	postcopy bool
	// fetchStreams are the source's first fetch streams, relayed to the
	// lazy-pages helper (a resumed session's belong to their relays).
	fetchStreams [2]*transport.Stream
	link         *postcopyLink // where PostcopyDone goes; a reconnect replaces it
	m            machine       // this end's state
	j            *journal      // its journal entry; nil if it could not be written
	pid          int           // restored root
	// store is the page store while pages arrive (checkDisk reads it).
	store atomic.Pointer[pagestore.Store]
	// deadline ends the part the source drives (MaxMigrationTime).
	deadline time.Time
	// reserve is the memory a prefault filled, held until the restore
	// starts (or the migration ends).
	reserve *prefaulted
}

// handle runs one session to its end.
func (s *Server) handle(ctx context.Context, sess *transport.Session) {
	defer sess.Close()
	log := s.log.With("peer", sess.Peer().String())
	if err := s.openSession(sess); err != nil {
		log.Warn("session refused", "err", err)
		return
	}
	defer s.closeSession(sess)
	// A session that never opens its control stream holds a connection
	// and a goroutine: it gets HelloTimeout, as the hello itself does.
	first, cancel := context.WithTimeout(ctx, s.cfg.HelloTimeout)
	stream, err := sess.AcceptStream(first)
	cancel()
	if err != nil {
		log.Warn("no control stream", "err", err, "within", s.cfg.HelloTimeout)
		return
	}
	defer stream.Close()
	ctl := wire.NewConn(stream)
	in, err := s.accept(ctx, sess, stream, ctl, log)
	if errors.Is(err, errResumed) {
		return
	}
	if err != nil {
		log.Warn("migration refused", "err", err)
		return
	}
	defer s.forget(in)
	if err := s.receive(ctx, in, stream); err != nil {
		in.log.Warn("migration failed", "err", err)
	}
}

// checkRequest checks what a hello asks for: the mode (post-copy and
// hybrid need userfaultfd here) and the CRIU options (valid, and allowed
// by the restore policy).
func (s *Server) checkRequest(h *wire.Hello) (postcopy bool, opts criu.Options, err error) {
	switch h.GetMode() {
	case wire.Mode_MODE_COLD, wire.Mode_MODE_PRECOPY:
	case wire.Mode_MODE_POSTCOPY, wire.Mode_MODE_HYBRID:
		// The tree resumes before its memory arrived: only a lazy
		// restore can do that.
		if err := linux.HaveUserfaultfd(); err != nil {
			return false, opts, fmt.Errorf("mode %v needs userfaultfd for the lazy restore: %v", h.GetMode(), err)
		}
		postcopy = true
	default:
		return false, opts, fmt.Errorf("mode %v not supported", h.GetMode())
	}
	opts = optionsFromWire(h.GetCriu())
	if err := opts.Validate(); err != nil {
		return false, opts, err
	}
	return postcopy, opts, s.policy.checkOptions(opts)
}

// accept reads the hello and answers it.
func (s *Server) accept(ctx context.Context, sess *transport.Session, stream *transport.Stream, ctl *wire.Conn, log *slog.Logger) (*incoming, error) {
	stop := deadline(ctx, stream, s.cfg.HelloTimeout)
	defer stop()
	m, err := ctl.Recv()
	if err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	h := m.GetHello()
	refuse := func(reason string) error {
		ctl.Send(&wire.Message{Body: &wire.Message_HelloReply{HelloReply: &wire.HelloReply{Reason: reason}}})
		return errors.New(reason)
	}
	if h == nil {
		return nil, refuse(fmt.Sprintf("expected hello, got %s", wire.Name(m)))
	}
	if h.GetMaxVersion() < wire.MinVersion || h.GetMinVersion() > wire.MaxVersion {
		return nil, refuse(fmt.Sprintf("protocol versions %d-%d not supported (this side: %d-%d)",
			h.GetMinVersion(), h.GetMaxVersion(), wire.MinVersion, wire.MaxVersion))
	}
	version := min(h.GetMaxVersion(), uint32(wire.MaxVersion))
	if !migrationIDRe.MatchString(h.GetMigrationId()) {
		return nil, refuse("bad migration id")
	}
	if h.GetResume() {
		return nil, s.resume(ctx, sess, ctl, h, version, log)
	}
	postcopy, opts, err := s.checkRequest(h)
	if err != nil {
		return nil, refuse(err.Error())
	}
	local, err := localReport(ctx, s.cfg.CRIUPath, log)
	if err != nil {
		return nil, refuse(fmt.Sprintf("destination pre-flight: %v", err))
	}
	reply := func(accepted bool, reason string) error {
		r := &wire.HelloReply{Accepted: accepted, Reason: reason, Host: local}
		if accepted {
			r.Version = version
		}
		return ctl.Send(&wire.Message{Body: &wire.Message_HelloReply{HelloReply: r}})
	}
	if !local.GetOk() {
		reason := "destination cannot restore: " + failedItems(local)
		reply(false, reason)
		return nil, errors.New(reason)
	}
	if err := checkPeer(h.GetHost(), local); err != nil {
		reply(false, err.Error())
		return nil, err
	}
	in := &incoming{id: h.GetMigrationId(), sess: sess, ctl: ctl, opts: opts, postcopy: postcopy, mode: modeFromWire(h.GetMode()),
		log: log.With("migration", h.GetMigrationId()), deadline: time.Now().Add(s.cfg.MaxMigrationTime)}
	in.m.log = in.log
	if postcopy {
		in.link = newPostcopyLink(ctl, sess.Peer())
	}
	if err := s.checkDisk(); err != nil {
		reply(false, err.Error())
		return nil, err
	}
	if err := s.register(in); err != nil {
		reply(false, err.Error())
		return nil, err
	}
	in.dir = filepath.Join(s.cfg.WorkDir, in.id)
	if err := os.Mkdir(in.dir, 0o700); err != nil {
		s.forget(in)
		reply(false, "destination work dir: "+err.Error())
		return nil, fmt.Errorf("work dir: %w", err)
	}
	if err := os.Mkdir(filepath.Join(in.dir, "images"), 0o700); err != nil {
		s.cleanup(in)
		s.forget(in)
		reply(false, "destination work dir: "+err.Error())
		return nil, fmt.Errorf("work dir: %w", err)
	}
	s.openJournal(in, in.mode)
	if err := reply(true, ""); err != nil {
		s.cleanup(in)
		s.forget(in)
		return nil, err
	}
	in.phase(PhaseConnect)
	in.log.Info("migration accepted", "source", h.GetHost().GetHostname(), "version", version)
	return in, nil
}

// receive runs a migration from its accepted hello to the end.
func (s *Server) receive(ctx context.Context, in *incoming, stream *transport.Stream) error {
	prepared, committed := false, false
	defer func() {
		switch {
		case committed:
			s.finishRestore(in)
		case !prepared:
			s.cleanup(in)
		}
		// Prepared but not committed: awaitCommit cleaned up on ABORT or
		// left the tree in doubt.
	}()
	files, err := s.collectBounded(ctx, in, stream)
	if err != nil {
		return err
	}
	// What the images would make, checked before CRIU runs.
	facts, err := images.ReadTreeFacts(filepath.Join(in.dir, "images"))
	if err == nil {
		err = s.policy.checkTree(facts)
	}
	if err != nil {
		err = fmt.Errorf("restore refused: %w", err)
		in.abort(err.Error())
		return err
	}
	t0 := time.Now()
	pid, err := s.restore(ctx, in)
	if err != nil {
		in.abort(err.Error())
		return err
	}
	in.pid = pid
	if in.lazy != nil {
		if err := in.lazy.park(pid); err != nil {
			in.abort(err.Error())
			return err
		}
	}
	// Recorded before PREPARED goes: once the source has it, it may end
	// its copy, and a service that dies then must find this one held, not
	// undo it as unprepared.
	in.phase(PhasePrepared)
	if err := in.hold.gone(); err != nil {
		// The rebuilt tree died with its CRIU: PREPARED must not go, or
		// the source ends the only copy.
		in.abort("the destination's CRIU ended holding the restored tree: " + err.Error())
		return fmt.Errorf("restore: %w", err)
	}
	err = in.ctl.Send(&wire.Message{Body: &wire.Message_Prepared{Prepared: &wire.Prepared{
		Pid: int32(pid), RestoreNanos: uint64(time.Since(t0)), ReceivedBytes: images.Total(files)}}})
	if err != nil {
		// PREPARED never reached the source (the stream is closed or
		// reset, and a partial frame does not decode), so the source
		// cannot have committed: the restored copy goes.
		return fmt.Errorf("send prepared: %w", err)
	}
	prepared = true
	committed, err = s.awaitCommit(ctx, in, stream)
	return err
}

// collectBounded collects within the migration's deadline and the disk
// budget; it tells the source why it stopped.
func (s *Server) collectBounded(ctx context.Context, in *incoming, stream *transport.Stream) ([]images.File, error) {
	dctx, cancel := context.WithDeadline(ctx, in.deadline)
	defer cancel()
	cctx, stop := context.WithCancelCause(dctx)
	defer stop(nil)
	go s.watchDisk(cctx, 250*time.Millisecond, stop) // ends with cctx
	files, err := s.collect(cctx, in, stream)
	cause := context.Cause(cctx)
	switch {
	case err == nil:
		return files, nil
	case ctx.Err() != nil:
		in.abort("destination shutting down")
	case errors.Is(cause, context.DeadlineExceeded):
		err = fmt.Errorf("migration took longer than --max-migration-time %v: %w", s.cfg.MaxMigrationTime, err)
		in.abort(err.Error())
	case errors.Is(cause, errDiskBudget):
		err = fmt.Errorf("%w (while receiving)", cause)
		in.abort(err.Error())
	}
	return nil, err
}

// abort tells the source to give up; best effort.
func (in *incoming) abort(reason string) {
	if err := in.ctl.Send(&wire.Message{Body: &wire.Message_Abort{Abort: &wire.Abort{Reason: reason}}}); err != nil {
		in.log.Debug("send abort", "err", err)
	}
}

// collect receives the images (on their own stream) and the RESTORE
// manifest (on control), answering pings, and checks that they agree.
func (s *Server) collect(ctx context.Context, in *incoming, stream *transport.Stream) ([]images.File, error) {
	type result struct {
		files []images.File
		err   error
	}
	recvDone := make(chan result, 1)
	rctx, cancelRecv := context.WithCancel(ctx)
	defer func() {
		cancelRecv()
		<-recvDone // the receiver goroutine is owned here
	}()
	go func() {
		files, err := s.receiveImages(rctx, in)
		if err != nil && rctx.Err() == nil {
			// Tell the source at once: it is still sending.
			in.abort(err.Error())
		}
		recvDone <- result{files, err}
	}()

	stop := deadline(ctx, stream, s.cfg.StepTimeout)
	defer stop()
	var restore *wire.Restore
	for restore == nil {
		m, err := in.ctl.Recv()
		if err != nil {
			return nil, fmt.Errorf("wait for restore: %w", err)
		}
		switch b := m.GetBody().(type) {
		case *wire.Message_Ping:
			if err := s.pong(ctx, in, b.Ping, stream); err != nil {
				return nil, err
			}
		case *wire.Message_Restore:
			restore = b.Restore
		case *wire.Message_Abort:
			err := fmt.Errorf("%w by source: %s", ErrAborted, b.Abort.GetReason())
			select {
			case r := <-recvDone:
				recvDone <- r // for the deferred wait
				if r.err != nil {
					err = fmt.Errorf("%w (after: %w)", r.err, err)
				}
			default:
			}
			return nil, err
		default:
			err := fmt.Errorf("wait for restore: unexpected %s", wire.Name(m))
			in.abort(err.Error())
			return nil, err
		}
	}
	r := <-recvDone
	recvDone <- r // for the deferred wait
	if r.err != nil {
		return nil, r.err // the source was told when it happened
	}
	want := make([]images.File, len(restore.GetFiles()))
	for i, f := range restore.GetFiles() {
		want[i] = images.File{Name: f.GetName(), Size: f.GetSize()}
	}
	if !images.Equal(want, r.files) {
		err := errors.New("images received do not match the manifest")
		in.abort(err.Error())
		return nil, err
	}
	return r.files, nil
}

// pong answers a ping: a populate probe, a prefault or its release, as
// the source asks. A ping proves the source alive: pre-copy sends one per
// round, and the step timeout bounds a round, not them all; the
// migration's own deadline bounds them all.
func (s *Server) pong(ctx context.Context, in *incoming, ping *wire.Ping, stream *transport.Stream) error {
	pong := &wire.Pong{Seq: ping.GetSeq()}
	lazy := s.lazyRestore(in)
	if ping.GetProbePopulate() {
		// A lazy restore writes no memory inside the freeze.
		pong.PopulateNsPerMib = 1
		if !lazy {
			pong.PopulateNsPerMib = probePopulate(in.log)
		}
	}
	if n := ping.GetPrefaultBytes(); n > 0 && !lazy {
		in.reserve.Release()
		in.reserve = s.prefault(in.log, n)
	}
	if ping.GetReleasePrefault() && in.reserve != nil {
		r := in.reserve
		in.reserve = nil
		go r.Release() // owns r; the restore starts well after
	}
	if err := in.ctl.Send(&wire.Message{Body: &wire.Message_Pong{Pong: pong}}); err != nil {
		return err
	}
	if ctx.Err() == nil {
		next := time.Now().Add(s.cfg.StepTimeout)
		if next.After(in.deadline) {
			next = in.deadline
		}
		stream.SetDeadline(next)
	}
	return nil
}

// populateProbeBytes is the fresh memory a populate probe fills: 64 MiB,
// about 45 ms here with reused memory, 160 ms with memory the VM never
// touched.
const populateProbeBytes = 64 << 20

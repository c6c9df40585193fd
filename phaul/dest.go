package phaul

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
	"github.com/phaul/phaul/pageserver"
)

// ErrBusy is the refusal reason when MaxMigrations are in progress.
var ErrBusy = errors.New("phaul: destination busy")

var migrationIDRe = regexp.MustCompile(`^[0-9a-f]{16}$`)

// Server is the destination service: it accepts migrations, restores them
// and runs them on COMMIT.
type Server struct {
	cfg  ServeConfig
	log  *slog.Logger
	crit *criu.Binary

	mu      sync.Mutex
	active  map[string]*incoming // guarded by mu
	inDoubt map[string]int       // migration id -> stopped root pid; guarded by mu
	dropped recentIDs            // migrations dropped before COMMIT; guarded by mu
}

// Serve listens and serves migrations until ctx ends. On return every
// migration has finished, been aborted, or been left in doubt (reported in
// the log and in its work dir's state file).
func Serve(ctx context.Context, cfg ServeConfig) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := discardIfNil(cfg.Logger)
	id, err := transport.LoadTLS(cfg.TLSDir)
	if err != nil {
		return fmt.Errorf("tls dir: %w", err)
	}
	bin, err := criu.Locate(ctx, cfg.CRIUPath, log)
	if err != nil {
		return err
	}
	log.Info("using criu", "path", bin.Path, "from", bin.Source, "version", bin.Version.String())
	if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return fmt.Errorf("work dir: %w", err)
	}
	if err := writable(cfg.WorkDir); err != nil {
		return fmt.Errorf("work dir: %w", err)
	}
	if err := cgroup.CheckParent(cfg.CgroupParent); err != nil {
		return fmt.Errorf("--cgroup-parent: %w", err)
	}
	if err := linux.HaveUserfaultfd(); cfg.LazyRestore && err != nil {
		log.Warn("--lazy-restore: restores write all memory here: no userfaultfd", "err", err)
	}
	tcfg := cfg.Transport
	tcfg.Identity = id
	tcfg.Logger = log
	ln, err := transport.Listen(ctx, cfg.Listen, tcfg)
	if err != nil {
		return err
	}
	defer ln.Close()
	s := &Server{cfg: cfg, log: log, crit: bin, active: map[string]*incoming{}, inDoubt: map[string]int{}}
	s.recoverJournal() // before anyone is told it serves
	log.Info("serving", "addr", ln.Addr().String(), "work_dir", cfg.WorkDir)
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr())
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		sess, err := ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				log.Info("stopping", "in_flight", s.count())
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.handle(ctx, sess)
		}()
	}
}

func (s *Server) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.active)
}

func writable(dir string) error {
	f, err := os.CreateTemp(dir, ".probe-*")
	if err != nil {
		return err
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

// incoming is one migration being received.
type incoming struct {
	id    string
	dir   string // WorkDir/<id>; removed unless the tree runs or is in doubt
	log   *slog.Logger
	sess  *transport.Session
	ctl   *wire.Conn
	opts  criu.Options
	group *cgroup.Group // phaul/<id>: CRIU and the tree it restores until COMMIT
	hold  *heldRestore  // the restore, held in post-restore until COMMIT
	lazy  *lazyRestore  // its lazy-pages daemon; nil: the restore writes all memory
	// postcopy: the tree resumes before its memory arrived; fetch is the
	// source's end of the fetch streams it asks for the rest on.
	mode     Mode
	postcopy bool
	fetch    *fetchClients
	link     *postcopyLink // where PostcopyDone goes; a reconnect replaces it
	m        machine       // this end's state
	j        *journal      // its journal entry; nil if it could not be written
	pid      int           // restored root
	// reserve is the memory a prefault filled, held until the restore
	// starts (or the migration ends).
	reserve *linux.Reserve
}

// handle runs one session to its end.
func (s *Server) handle(ctx context.Context, sess *transport.Session) {
	defer sess.Close()
	log := s.log.With("peer", sess.Peer().String())
	stream, err := sess.AcceptStream(ctx)
	if err != nil {
		log.Warn("no control stream", "err", err)
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
	postcopy := false
	switch h.GetMode() {
	case wire.Mode_MODE_COLD, wire.Mode_MODE_PRECOPY:
	case wire.Mode_MODE_POSTCOPY, wire.Mode_MODE_HYBRID:
		// The tree resumes before its memory arrived: only a lazy
		// restore can do that.
		if err := linux.HaveUserfaultfd(); err != nil {
			return nil, refuse(fmt.Sprintf("mode %v needs userfaultfd for the lazy restore: %v", h.GetMode(), err))
		}
		postcopy = true
	default:
		return nil, refuse(fmt.Sprintf("mode %v not supported", h.GetMode()))
	}
	opts := optionsFromWire(h.GetCriu())
	if err := opts.Validate(); err != nil {
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
		log: log.With("migration", h.GetMigrationId())}
	in.m.log = in.log
	if postcopy {
		in.link = newPostcopyLink(ctl, sess.Peer())
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

func (s *Server) register(in *incoming) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.active[in.id]; dup {
		return fmt.Errorf("migration %s already in progress", in.id)
	}
	if _, dup := s.inDoubt[in.id]; dup {
		return fmt.Errorf("migration %s is in doubt here", in.id)
	}
	if len(s.active) >= s.cfg.MaxMigrations {
		return fmt.Errorf("%w: %d migrations in progress", ErrBusy, len(s.active))
	}
	s.active[in.id] = in
	return nil
}

func (s *Server) forget(in *incoming) {
	in.reserve.Release() // whatever path the migration took
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.active, in.id)
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
	files, err := s.collect(ctx, in, stream)
	if err != nil {
		if ctx.Err() != nil {
			in.abort("destination shutting down")
		}
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
		if err := in.lazy.park(); err != nil {
			in.abort(err.Error())
			return err
		}
	}
	// Recorded before PREPARED goes: once the source has it, it may end
	// its copy, and a service that dies then must find this one held, not
	// undo it as unprepared.
	in.phase(PhasePrepared)
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
			pong := &wire.Pong{Seq: b.Ping.GetSeq()}
			lazy := s.lazyRestore(in)
			if b.Ping.GetProbePopulate() {
				// A lazy restore writes no memory inside the freeze.
				pong.PopulateNsPerMib = 1
				if !lazy {
					pong.PopulateNsPerMib = probePopulate(in.log)
				}
			}
			if n := b.Ping.GetPrefaultBytes(); n > 0 && !lazy {
				in.reserve.Release()
				in.reserve = prefault(in.log, n)
			}
			if b.Ping.GetReleasePrefault() && in.reserve != nil {
				r := in.reserve
				in.reserve = nil
				go r.Release() // owns r; the restore starts well after
			}
			if err := in.ctl.Send(&wire.Message{Body: &wire.Message_Pong{Pong: pong}}); err != nil {
				return nil, err
			}
			// A ping proves the source alive: pre-copy sends one per
			// round, and the step timeout bounds a round, not them all.
			if ctx.Err() == nil {
				stream.SetDeadline(time.Now().Add(s.cfg.StepTimeout))
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

// awaitCommit waits for COMMIT or ABORT with the tree held in CRIU's
// restore. It returns true once the tree runs.
func (s *Server) awaitCommit(ctx context.Context, in *incoming, stream *transport.Stream) (bool, error) {
	// Shutdown does not cut this wait short at once: the source may have
	// killed its copy already, so the service gives COMMIT CommitWait to
	// arrive before it leaves the tree in doubt.
	waitCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stopOnShutdown := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(s.cfg.CommitWait, cancel)
		context.AfterFunc(waitCtx, func() { t.Stop() })
	})
	defer stopOnShutdown()
	stop := deadline(waitCtx, stream, s.cfg.StepTimeout)
	defer stop()
	m, err := in.ctl.Recv()
	if err != nil && in.postcopy {
		// A post-copy source ends its copy only after PostcopyDone,
		// which follows COMMIT: without COMMIT that copy is whole, held
		// by its CRIU, and the one to resume. A source that comes back
		// to resume is told so (dropped).
		s.cleanup(in)
		in.log.Warn("post-copy: source lost before COMMIT; its copy is whole and held there: restored tree dropped", "err", err)
		return false, fmt.Errorf("post-copy: source lost before COMMIT: %w", err)
	}
	if err != nil {
		s.inDoubtHold(in, fmt.Errorf("wait for commit: %w", err))
		return false, fmt.Errorf("%w: %w", ErrInDoubt, err)
	}
	switch b := m.GetBody().(type) {
	case *wire.Message_Commit:
		in.phase(PhaseCommit)
		if err := s.commit(in); err != nil {
			in.phase(PhaseInDoubt)
			return false, err
		}
		in.log.Info("committed: tree runs", "pid", in.pid)
		if err := in.ctl.Send(&wire.Message{Body: &wire.Message_Committed{Committed: &wire.Committed{Pid: int32(in.pid)}}}); err != nil {
			// The migration is done: the tree runs here and the source
			// had killed its copy before it sent COMMIT. Only the
			// confirmation did not arrive (the source may already have
			// closed the session).
			in.log.Info("committed; confirmation not delivered to the source", "err", err)
		}
		return true, nil
	case *wire.Message_Abort:
		s.cleanup(in)
		in.log.Info("aborted by the source after prepared: restored tree dropped", "reason", b.Abort.GetReason())
		return false, nil
	default:
		s.inDoubtHold(in, fmt.Errorf("unexpected %s while prepared", wire.Name(m)))
		return false, fmt.Errorf("%w: unexpected %s", ErrInDoubt, wire.Name(m))
	}
}

// inDoubtHold leaves a prepared tree held inside CRIU's restore and
// records it. CRIU keeps its own copy of the RPC socket, so the tree stays
// held (rebuilt, never run) even after this service exits. A lazily
// restored tree gets all of its memory first, so that it no longer needs
// this service's lazy-pages daemon.
func (s *Server) inDoubtHold(in *incoming, why error) {
	in.phase(PhaseInDoubt)
	s.mu.Lock()
	s.inDoubt[in.id] = in.pid
	s.mu.Unlock()
	memory := memoryComplete
	if in.lazy != nil {
		// Recorded first: if this service dies during the fill, the
		// tree misses pages for good.
		in.hold.record(in, why, memoryFilling)
		if err := in.lazy.detach(s.cfg.RestoreTimeout); err != nil {
			memory = memoryIncomplete
			in.log.Error("in-doubt tree misses memory: if told to resume it, CRIU kills it", "err", err)
		}
	}
	in.hold.record(in, why, memory)
	in.log.Error("migration in doubt: restored tree held inside CRIU's restore, never run; resolve by hand: "+
		"kill CRIU and the cgroup's processes to drop it, or answer CRIU's post-restore notification on its fd criu_rpc_fd",
		"pid", in.pid, "criu", in.hold.criuPID, "criu_rpc_fd", in.hold.peerFD, "cgroup", cgroup.Parent+"/"+in.id,
		"memory", memory, "reason", why)
}

func (s *Server) receiveImages(ctx context.Context, in *incoming) ([]images.File, error) {
	// Streams come in the order the source opened them: the page streams
	// (CRIU dumps into the source's page server, which forwards here; the
	// first one's lane frame says how many), then the other images.
	st, err := in.sess.AcceptStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("images stream: %w", err)
	}
	var pagesDone chan error
	if st.Kind() == transport.KindPages {
		if in.postcopy || in.mode == ModePrecopy {
			in.phase(PhaseRounds) // or the freeze: this end cannot tell
		} else {
			in.phase(PhaseDump)
		}
		lanes, err := s.acceptLanes(ctx, in, st)
		if err != nil {
			return nil, err
		}
		pagesDone = make(chan error, 1)
		go func() { // owned here: waited for below
			defer func() {
				for _, l := range lanes {
					l.Close()
				}
			}()
			pagesDone <- s.receivePages(ctx, in, lanes)
		}()
		if st, err = in.sess.AcceptStream(ctx); err != nil {
			return nil, errors.Join(fmt.Errorf("images stream: %w", err), <-pagesDone)
		}
		if in.postcopy {
			// Then post-copy's fetch streams.
			fst, err := acceptFetch(ctx, in.sess, st)
			if err == nil {
				in.fetch = newFetchClients(fst, s.cfg.PostcopyRecoverTimeout)
				st, err = in.sess.AcceptStream(ctx)
			}
			if err != nil {
				return nil, errors.Join(err, <-pagesDone)
			}
		}
	}
	defer st.Close()
	if st.Kind() == transport.KindImages {
		in.phase(PhaseTransfer)
	}
	if st.Kind() != transport.KindImages {
		err := fmt.Errorf("images stream: got a %s stream", st.Kind())
		if pagesDone != nil {
			err = errors.Join(err, <-pagesDone)
		}
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
	defer stop()
	files, err := images.Receive(st, filepath.Join(in.dir, "images"), s.cfg.Limits, nil)
	if pagesDone != nil {
		// The source ends the page streams before it sends the images:
		// this only waits on a broken one.
		err = errors.Join(err, <-pagesDone)
	}
	if err != nil {
		return nil, fmt.Errorf("receive images: %w", err)
	}
	in.log.Info("images received", "files", len(files), "bytes", images.Total(files))
	return files, nil
}

// acceptLanes reads the lane frame of first, the first page stream, and
// accepts the other page streams it announces, each checked to be a page
// stream with its own lane number. It returns them in lane order, or
// closes them all.
func (s *Server) acceptLanes(ctx context.Context, in *incoming, first *transport.Stream) (lanes []*transport.Stream, err error) {
	defer func() {
		if err != nil {
			first.Close()
			for _, l := range lanes {
				if l != nil && l != first {
					l.Close()
				}
			}
		}
	}()
	stop := context.AfterFunc(ctx, func() { first.SetDeadline(time.Now()) })
	idx, n, err := pageserver.ReadLane(first)
	stop()
	if err != nil {
		return nil, fmt.Errorf("pages stream: %w", err)
	}
	lanes = make([]*transport.Stream, n) // n <= pageserver.MaxLanes
	lanes[idx] = first
	for range n - 1 {
		st, err := in.sess.AcceptStream(ctx)
		if err != nil {
			return lanes, fmt.Errorf("pages stream: %w", err)
		}
		if st.Kind() != transport.KindPages {
			st.Close()
			return lanes, fmt.Errorf("pages stream: got a %s stream where lane %d of %d belongs", st.Kind(), len(lanes), n)
		}
		stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
		i, m, err := pageserver.ReadLane(st)
		stop()
		if err == nil && (m != n || lanes[i] != nil) {
			err = fmt.Errorf("%w: lane %d of %d after lane %d of %d", pageserver.ErrForward, i, m, idx, n)
		}
		if err != nil {
			st.Close()
			return lanes, fmt.Errorf("pages stream: %w", err)
		}
		lanes[i] = st
	}
	return lanes, nil
}

// populateProbeBytes is the fresh memory a populate probe fills: 64 MiB,
// about 45 ms here with reused memory, 160 ms with memory the VM never
// touched.
const populateProbeBytes = 64 << 20

// probePopulate measures what filling fresh anonymous memory costs here,
// per MiB (0 if the probe failed: the source then predicts without it).
func probePopulate(log *slog.Logger) uint64 {
	d, err := linux.PopulateCost(populateProbeBytes)
	if err != nil {
		log.Warn("populate probe", "err", err)
		return 0
	}
	perMiB := uint64(d.Nanoseconds()) / (populateProbeBytes >> 20)
	log.Info("populate probe", "mib", populateProbeBytes>>20, "dur", d, "per_mib", time.Duration(perMiB))
	return max(perMiB, 1)
}

// prefault fills n bytes of fresh anonymous memory, at most half of what
// the host has available, and holds it: restore releases it just before
// CRIU restores, and memory the kernel just freed is what it hands out
// next. The restore then reuses memory instead of touching it for the
// first time (on this VM 2-3 times dearer, 1.5-2.5 ms/MiB against 0.7;
// held rather than freed at once, because a VM's free page reporting gives
// memory that stays free back to the host within seconds).
func prefault(log *slog.Logger, n uint64) *linux.Reserve {
	avail, err := linux.MemAvailable()
	if err != nil {
		log.Warn("prefault", "err", err)
		return nil
	}
	n = min(n, avail/2) &^ (1<<20 - 1)
	if n == 0 {
		return nil
	}
	r, d, err := linux.Prefault(int(n))
	if err != nil {
		log.Warn("prefault", "err", err)
		return nil
	}
	log.Info("prefaulted memory for the restore", "mib", n>>20, "dur", d)
	return r
}

// receivePages stores the forwarded pages and writes them as CRIU images
// (pagemap-*.img, pages-*.img) into the migration's images directory.
func (s *Server) receivePages(ctx context.Context, in *incoming, lanes []*transport.Stream) error {
	cfg := pagestore.DefaultConfig(filepath.Join(in.dir, "images"))
	cfg.SpoolDir = filepath.Join(in.dir, "pages.spool")
	cfg.Logger = in.log
	// The restore reads these images at once; a crash aborts the migration
	// whatever was synced.
	cfg.NoSync = true
	// Pre-copy's later rounds break the spool's image order; two levels
	// link the spool instead of copying it inside the freeze.
	cfg.Levels = true
	store, err := pagestore.New(cfg)
	if err != nil {
		return fmt.Errorf("page store: %w", err)
	}
	defer store.Close()
	rws := make([]io.ReadWriter, len(lanes))
	for i, st := range lanes {
		rws[i] = st
		stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
		defer stop()
	}
	t0 := time.Now()
	ps, err := pageserver.ReceiveLanes(store, rws...)
	if err != nil {
		return fmt.Errorf("receive pages: %w", err)
	}
	in.log.Info("pages received", "pages", ps.Pages, "zero", ps.ZeroPages, "dup", ps.DupPages,
		"bytes", ps.RawBytes, "wire_bytes", ps.WireBytes, "lanes", len(lanes), "dur", time.Since(t0))
	return nil
}

// lazyRestore reports whether in's restore is lazy: post-copy's always
// is, the others with --lazy-restore.
func (s *Server) lazyRestore(in *incoming) bool {
	return in.postcopy || (s.cfg.LazyRestore && linux.HaveUserfaultfd() == nil)
}

// restore has CRIU rebuild the tree inside a cgroup this service owns
// (phaul/<id>, so the tree is neither part of the service's unit nor its
// child) and hold it in the post-restore notification: it returns the
// restored root's pid with no task of the tree having run.
func (s *Server) restore(ctx context.Context, in *incoming) (int, error) {
	in.phase(PhaseRestore)
	g, err := cgroup.Create(in.id)
	if err != nil {
		return 0, fmt.Errorf("restore: %w", err)
	}
	in.group = g
	in.reserve.Release() // for the restore to reuse
	req := criu.RestoreRequest{
		ImagesDir: filepath.Join(in.dir, "images"),
		WorkDir:   in.dir,
		Options:   in.opts,
		Hooks:     criu.Hooks{Started: g.Add},
	}
	if s.lazyRestore(in) {
		if in.lazy, err = startLazyRestore(in.dir, req.ImagesDir, in.fetch, in.log); err != nil {
			return 0, fmt.Errorf("restore: %w", err)
		}
		req.LazyPages = true
	}
	in.hold = startRestore(ctx, s.crit, req, s.cfg.RestoreTimeout)
	pid, err := in.hold.wait()
	if err != nil {
		in.hold = nil
		in.lazy.abort()
		in.lazy = nil
		return 0, fmt.Errorf("restore: %w", err)
	}
	return pid, nil
}

// commit moves the held tree where it lives from now on and lets CRIU
// resume it. With --manage-cgroups CRIU has put it in its own cgroups;
// otherwise it is in phaul/<id> and moves to the service's cgroup parent.
// Then phaul/<id> goes.
func (s *Server) commit(in *incoming) error {
	if in.lazy != nil {
		if lerr := in.lazy.failed(); lerr != nil {
			// Parked, CRIU would resume the tree with its lazy pages
			// reading as zeros.
			if err := in.lazy.refill(filepath.Join(in.dir, "images"), in.pid); err != nil {
				in.log.Error("lazy-pages daemon failed before the tree ran and its pages cannot be written otherwise: "+
					"the tree is dropped, not run without them; the migration is lost", "daemon", lerr, "err", err)
				in.hold.Kill()
				in.hold = nil
				return fmt.Errorf("restored tree dropped: its lazy pages are lost: %w", lerr)
			}
		}
	}
	if err := in.group.MoveAll(s.cfg.CgroupParent); err != nil {
		// The source's copy is gone: the tree must run, wherever it is.
		in.log.Error("move restored tree to its cgroup parent", "parent", s.cfg.CgroupParent, "err", err)
	}
	if err := in.hold.Resume(); err != nil {
		in.log.Error("criu after resuming the restored tree", "err", err)
	}
	if err := in.group.Remove(); err != nil {
		in.log.Warn("remove cgroup", "err", err)
	}
	return nil
}

// cleanup drops whatever was restored and removes the migration's files
// and cgroup.
func (s *Server) cleanup(in *incoming) {
	if in.hold != nil {
		in.hold.Kill()
		in.hold = nil
	}
	in.lazy.abort() // after the tree is gone
	in.lazy = nil
	in.fetch.close()
	if in.group != nil {
		if err := in.group.Kill(5 * time.Second); err != nil {
			in.log.Error("kill restored tree", "err", err)
		}
		if err := in.group.Remove(); err != nil {
			in.log.Warn("remove cgroup", "err", err)
		}
	}
	if in.dir != "" {
		if err := os.RemoveAll(in.dir); err != nil {
			in.log.Warn("remove work dir", "err", err)
		}
	}
	in.phase(PhaseRollback)
	in.endJournal()
	s.mu.Lock()
	s.dropped.add(in.id)
	s.mu.Unlock()
}

// recentIDs remembers the last migrations a service dropped before they
// committed, so that a post-copy source which lost its connection at
// COMMIT learns for sure that its copy is the one to resume. A bounded
// memory: a service restarted since does not know, and says nothing.
type recentIDs struct {
	ids  []string
	next int
}

const recentDropped = 256

func (r *recentIDs) add(id string) {
	if len(r.ids) < recentDropped {
		r.ids = append(r.ids, id)
		return
	}
	r.ids[r.next] = id
	r.next = (r.next + 1) % recentDropped
}

func (r *recentIDs) has(id string) bool { return slices.Contains(r.ids, id) }

// finishRestore waits for a committed tree's lazy pages (the images are
// their source until the fill ends), tells a post-copy source that it may
// drop its copy, and removes the migration's files.
func (s *Server) finishRestore(in *incoming) {
	if in.postcopy {
		// A source that lost its connection may come back until
		// PostcopyDone is through.
		in.phase(PhasePostcopy)
		in.link.setResumable(true)
		defer in.link.end()
	}
	st, err := in.lazy.wait()
	if in.postcopy {
		var remote *remoteSource
		if in.lazy != nil {
			remote = in.lazy.remote
		}
		if err == nil {
			err = in.link.send(postcopyDoneMsg(st, remote), s.cfg.PostcopyRecoverTimeout)
		}
		if err != nil {
			in.log.Error("post-copy failed: the tree runs here and lacks pages the source held", "err", err)
		}
		in.fetch.close()
	}
	s.removeImages(in)
	if err == nil {
		in.phase(PhaseDone)
		in.endJournal()
	}
	// Else the entry stays: the tree runs without all of its memory.
}

// removeImages drops a committed migration's files.
func (s *Server) removeImages(in *incoming) {
	if err := os.RemoveAll(in.dir); err != nil {
		in.log.Warn("remove work dir", "err", err)
	}
}

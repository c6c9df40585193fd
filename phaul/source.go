package phaul

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
)

// Sentinels callers (and tests) branch on.
var (
	ErrBadTarget = errors.New("phaul: process cannot be migrated")
	ErrRefused   = errors.New("phaul: destination refused the migration")
	ErrInDoubt   = errors.New("phaul: migration in doubt: the source tree is gone and the destination did not confirm")
	ErrAborted   = errors.New("phaul: destination aborted")
)

// Migrate moves the tree rooted at cfg.PID to cfg.To. It returns the
// migration's statistics (never nil) and nil only when the tree runs on the
// destination. On any other error the tree runs on the source, except when
// the error wraps ErrInDoubt.
func Migrate(ctx context.Context, cfg MigrateConfig) (*Stats, error) {
	id := newID()
	st := newStats(id, cfg.Mode, cfg.To, cfg.PID)
	st.mark(PhasePreflight)
	log := discardIfNil(cfg.Logger).With("migration", id)
	s := &source{cfg: cfg, log: log, stats: st, m: machine{log: log}}
	err := s.run(ctx)
	switch {
	case err == nil:
		st.Result = ResultOK
	case errors.Is(err, ErrInDoubt):
		st.Result = ResultInDoubt
	default:
		st.Result = ResultFailed
	}
	if err != nil {
		st.Error = err.Error()
	}
	st.TotalMS = ms(time.Since(st.start))
	if s.sess != nil {
		st.BytesWire = s.sess.BytesWire()
	}
	if st.Result != ResultInDoubt {
		// Done or rolled back: nothing left to resolve. In doubt, the
		// entry stays for an operator or `phaul gc`.
		if jerr := s.j.remove(); jerr != nil {
			log.Error("journal", "err", jerr)
		}
	}
	return st, err
}

type source struct {
	cfg   MigrateConfig
	log   *slog.Logger
	stats *Stats
	sess  *transport.Session
	ctl   *wire.Conn
	// ctlStream carries ctl; pings counts keepalive pings.
	ctlStream *transport.Stream
	pings     uint64
	tcfg      transport.Config // with the identity: a post-copy reconnect dials again
	m         machine          // starts in PhasePreflight
	j         *journal         // this end's journal entry; nil before the work dir exists
	criuPID   int              // the dump's CRIU once it runs (fault injection)
}

func (s *source) progress(p Phase, bytes uint64) {
	if s.cfg.Progress != nil {
		s.cfg.Progress(Event{Phase: p, Bytes: bytes, Elapsed: time.Since(s.stats.start)})
	}
}

func (s *source) phase(p Phase) {
	if err := s.j.record(func(e *JournalEntry) { e.Phase = p }); err != nil {
		s.log.Error("journal", "phase", p, "err", err)
	}
	faultAt(RoleSource, p, s.criuPID)
	s.m.enter(p)
	s.stats.mark(p)
	s.log.Info("phase", "phase", p)
	s.progress(p, 0)
}

func (s *source) run(ctx context.Context) error {
	cfg := s.cfg
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := checkTarget(cfg.PID); err != nil {
		return err
	}
	id, err := transport.LoadTLS(cfg.TLSDir)
	if err != nil {
		return fmt.Errorf("tls dir: %w", err)
	}
	if !id.Dials() {
		return fmt.Errorf("tls dir: %s's certificate is for a destination only (phaul certs --role source or both)", cfg.TLSDir)
	}
	bin, err := criu.Locate(ctx, cfg.CRIUPath, s.log)
	if err != nil {
		return err
	}
	s.log.Info("using criu", "path", bin.Path, "from", bin.Source, "version", bin.Version.String())
	local, err := localReport(ctx, cfg.CRIUPath, s.log)
	if err != nil {
		return err
	}
	if !local.GetOk() {
		return fmt.Errorf("this host cannot migrate: %s", failedItems(local))
	}

	imagesDir := filepath.Join(cfg.WorkDir, s.stats.MigrationID)
	if err := privateDir(cfg.WorkDir); err != nil {
		return fmt.Errorf("work dir: %w", err)
	}
	if err := os.Mkdir(imagesDir, 0o700); err != nil {
		return fmt.Errorf("work dir: %w", err)
	}
	defer func() {
		if err := os.RemoveAll(imagesDir); err != nil {
			s.log.Warn("remove images", "dir", imagesDir, "err", err)
		}
	}()
	recoverSource(cfg.WorkDir, s.log)
	s.j, err = openJournal(JournalDir(cfg.WorkDir), s.stats.MigrationID, RoleSource,
		JournalEntry{Phase: PhasePreflight, Mode: cfg.Mode, Root: cfg.PID, ImagesDir: imagesDir, To: cfg.To, TLSDir: absPath(cfg.TLSDir)})
	if err != nil {
		return err
	}

	s.phase(PhaseConnect)
	tcfg := cfg.Transport
	tcfg.Identity = id
	tcfg.Logger = s.log
	s.tcfg = tcfg
	sess, err := transport.Dial(ctx, cfg.To, tcfg)
	if err != nil {
		return err
	}
	s.sess = sess
	defer func() { s.sess.Close() }() // a post-copy reconnect replaces it
	stream, err := sess.OpenStream(ctx, transport.KindControl)
	if err != nil {
		return fmt.Errorf("control stream: %w", err)
	}
	defer stream.Close()
	s.ctl, s.ctlStream = wire.NewConn(stream), stream
	if err := s.hello(ctx, stream, local); err != nil {
		return err
	}
	return s.dumpAndCommit(ctx, bin, imagesDir, stream)
}

// hello exchanges pre-flight reports and measures the round trip.
func (s *source) hello(ctx context.Context, stream *transport.Stream, local *wire.HostReport) error {
	cfg := s.cfg
	stop := deadline(ctx, stream, cfg.HelloTimeout)
	defer stop()
	err := s.ctl.Send(&wire.Message{Body: &wire.Message_Hello{Hello: &wire.Hello{
		MinVersion: wire.MinVersion, MaxVersion: wire.MaxVersion,
		MigrationId: s.stats.MigrationID, Mode: modeToWire(cfg.Mode),
		Host: local, Criu: optionsToWire(cfg.CRIU),
	}}})
	if err != nil {
		return err
	}
	m, err := s.ctl.Recv()
	if err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	r := m.GetHelloReply()
	if r == nil {
		return fmt.Errorf("hello: %w: got %s", wire.ErrFrame, wire.Name(m))
	}
	if !r.GetAccepted() {
		return fmt.Errorf("%w: %s", ErrRefused, r.GetReason())
	}
	if r.GetVersion() < wire.MinVersion || r.GetVersion() > wire.MaxVersion {
		return fmt.Errorf("hello: destination chose protocol version %d", r.GetVersion())
	}
	if err := checkPeer(local, r.GetHost()); err != nil {
		s.abort(fmt.Sprintf("source refuses: %v", err))
		return err
	}
	// The best of three pings: downtime subtracts half of it.
	rtt := time.Duration(1<<63 - 1)
	for seq := uint64(1); seq <= 3; seq++ {
		t0 := time.Now()
		if err := s.ctl.Send(&wire.Message{Body: &wire.Message_Ping{Ping: &wire.Ping{Seq: seq}}}); err != nil {
			return err
		}
		m, err := s.ctl.Recv()
		if err != nil {
			return fmt.Errorf("ping: %w", err)
		}
		if m.GetPong().GetSeq() != seq {
			return fmt.Errorf("ping: %w: got %s", wire.ErrFrame, wire.Name(m))
		}
		rtt = min(rtt, time.Since(t0))
	}
	s.stats.RTTMS = ms(rtt)
	s.log.Info("destination accepted", "peer", s.sess.Peer().String(), "rtt", rtt,
		"dest_kernel", r.GetHost().GetKernel(), "dest_criu", r.GetHost().GetCriuVersion())
	return nil
}

func modeFromWire(m wire.Mode) Mode {
	switch m {
	case wire.Mode_MODE_PRECOPY:
		return ModePrecopy
	case wire.Mode_MODE_POSTCOPY:
		return ModePostcopy
	case wire.Mode_MODE_HYBRID:
		return ModeHybrid
	}
	return ModeCold
}

func modeToWire(m Mode) wire.Mode {
	switch m {
	case ModePrecopy:
		return wire.Mode_MODE_PRECOPY
	case ModePostcopy:
		return wire.Mode_MODE_POSTCOPY
	case ModeHybrid:
		return wire.Mode_MODE_HYBRID
	}
	return wire.Mode_MODE_COLD
}

// keepalive pings the destination once and waits for the answer: between
// pre-copy rounds it proves both ends alive (the destination's wait for
// the next step starts again) and notices an ABORT early.
func (s *source) keepalive(ctx context.Context) error {
	_, err := s.ping(ctx, &wire.Ping{})
	return err
}

// probePopulate asks the destination what filling fresh memory costs
// there, per MiB (0: it could not tell).
func (s *source) probePopulate(ctx context.Context) (time.Duration, error) {
	ns, err := s.ping(ctx, &wire.Ping{ProbePopulate: true})
	return time.Duration(ns), err
}

// prefault asks the destination to fill and hold n bytes of memory (until
// a release_prefault ping or the restore) and waits until it has.
func (s *source) prefault(ctx context.Context, n uint64) error {
	_, err := s.ping(ctx, &wire.Ping{PrefaultBytes: n})
	return err
}

// ping sends a ping (its Seq set here) and returns the pong's probe
// result. A prefault gets 10 ms per MiB beyond the hello timeout.
func (s *source) ping(ctx context.Context, ping *wire.Ping) (uint64, error) {
	s.pings++
	seq := 100 + s.pings // the hello's pings are 1 to 3
	ping.Seq = seq
	if err := s.ctl.Send(&wire.Message{Body: &wire.Message_Ping{Ping: ping}}); err != nil {
		return 0, fmt.Errorf("keepalive: %w", err)
	}
	stop := deadline(ctx, s.ctlStream, s.cfg.HelloTimeout+time.Duration(ping.GetPrefaultBytes()>>20)*10*time.Millisecond)
	defer stop()
	m, err := s.ctl.Recv()
	if err != nil {
		return 0, fmt.Errorf("keepalive: %w", err)
	}
	if a := m.GetAbort(); a != nil {
		return 0, fmt.Errorf("%w: %s", ErrAborted, a.GetReason())
	}
	if m.GetPong().GetSeq() != seq {
		return 0, fmt.Errorf("keepalive: %w: got %s", wire.ErrFrame, wire.Name(m))
	}
	// Bounded: a probe that claims more than a second per MiB is noise.
	return min(m.GetPong().GetPopulateNsPerMib(), uint64(time.Second)), nil
}

// abort tells the destination to drop the migration; best effort.
func (s *source) abort(reason string) {
	if s.ctl == nil {
		return
	}
	if err := s.ctl.Send(&wire.Message{Body: &wire.Message_Abort{Abort: &wire.Abort{Reason: reason}}}); err != nil {
		s.log.Debug("send abort", "err", err)
	}
}

// commit sends COMMIT and returns the running tree's root pid from
// COMMITTED.
func (s *source) commit() (int, error) {
	if err := s.ctl.Send(&wire.Message{Body: &wire.Message_Commit{Commit: &wire.Commit{}}}); err != nil {
		return 0, fmt.Errorf("send commit: %w", err)
	}
	m, err := s.ctl.Recv()
	if err != nil {
		return 0, fmt.Errorf("wait for committed: %w", err)
	}
	if a := m.GetAbort(); a != nil {
		// The destination's copy never ran, and is dropped.
		return 0, fmt.Errorf("%w: answered COMMIT with ABORT: %s", errNotCommitted, a.GetReason())
	}
	c := m.GetCommitted()
	if c == nil {
		return 0, fmt.Errorf("destination answered %s to commit", wire.Name(m))
	}
	return int(c.GetPid()), nil
}

// precopyRounds runs pre-copy's rounds; with --prefault then the
// destination's prefault, rounds again until they stop as before (the
// tree dirtied memory meanwhile), and the prefault's release right before
// the freeze.
func (s *source) precopyRounds(ctx context.Context, pre *precopy) error {
	s.phase(PhaseRounds)
	reason, err := pre.rounds(ctx)
	if err != nil {
		return err
	}
	s.stats.StopReason = reason
	for _, pr := range pre.procs {
		s.stats.Tracker = pr.tr.Kind()
	}
	s.log.Info("pre-copy rounds done", "rounds", len(s.stats.Rounds), "why", reason)
	if !s.cfg.Prefault || s.cfg.Mode.postcopy() || pre.destLazy {
		// A lazy restore (hybrid's always) writes no memory in the
		// freeze: nothing to prefault.
		return nil
	}
	if err := pre.prefault(ctx); err != nil {
		return err
	}
	if reason, err = pre.rounds(ctx); err != nil {
		return err
	}
	s.stats.StopReason = "after the prefault: " + reason
	s.log.Info("pre-copy rounds after the prefault done", "rounds", len(s.stats.Rounds), "why", reason)
	// Freed now, the memory is still free and not yet handed back to a
	// hypervisor when the restore starts.
	if _, err := s.ping(ctx, &wire.Ping{ReleasePrefault: true}); err != nil {
		return fmt.Errorf("release the prefault: %w", err)
	}
	return nil
}

// rolledBack confirms the source tree still runs and says so in err.
func (s *source) rolledBack(err error) error {
	if alive, _ := linux.ProcessExists(s.cfg.PID); alive {
		return fmt.Errorf("%w (workload resumed on the source)", err)
	}
	return fmt.Errorf("%w (and pid %d no longer runs on the source)", err, s.cfg.PID)
}

// transfer ships the images and waits for PREPARED; it runs inside the
// post-dump notification with the tree frozen.
func (s *source) transfer(ctx context.Context, imagesDir string, ctlStream *transport.Stream) ([]images.File, *wire.Prepared, error) {
	s.phase(PhaseTransfer)
	st, err := s.sess.OpenStream(ctx, transport.KindImages)
	if err != nil {
		return nil, nil, fmt.Errorf("images stream: %w", err)
	}
	// Cancelling ctx (SIGTERM, SIGINT) must stop the transfer at once. A
	// write deadline fails a write waiting for the stream's window; one
	// waiting for the connection (slow link) is not woken by it, so every
	// write also checks ctx first.
	stopSend := context.AfterFunc(ctx, func() { st.SetWriteDeadline(time.Now()) })
	sent, err := images.Send(ctxStream{ctx, st}, imagesDir, func(n uint64) { s.progress(PhaseTransfer, n) })
	stopSend()
	if cerr := st.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if ctx.Err() != nil {
		return nil, nil, fmt.Errorf("send images: interrupted: %w", context.Cause(ctx))
	}
	if err != nil {
		return nil, nil, fmt.Errorf("send images: %w", s.peerReason(ctlStream, err))
	}
	manifest := make([]*wire.FileInfo, len(sent))
	for i, f := range sent {
		manifest[i] = &wire.FileInfo{Name: f.Name, Size: f.Size}
	}
	s.phase(PhaseRestore)
	stop := deadline(ctx, ctlStream, s.cfg.PrepareTimeout)
	defer stop()
	if err := s.ctl.Send(&wire.Message{Body: &wire.Message_Restore{Restore: &wire.Restore{Files: manifest}}}); err != nil {
		return nil, nil, err
	}
	m, err := s.ctl.Recv()
	if err != nil {
		return nil, nil, fmt.Errorf("wait for prepared: %w", err)
	}
	if a := m.GetAbort(); a != nil {
		return nil, nil, fmt.Errorf("%w: %s", ErrAborted, a.GetReason())
	}
	p := m.GetPrepared()
	if p == nil || p.GetPid() <= 0 {
		return nil, nil, fmt.Errorf("wait for prepared: %w: got %s", wire.ErrFrame, wire.Name(m))
	}
	s.phase(PhasePrepared)
	return sent, p, nil
}

// peerReason returns the destination's ABORT reason when one is waiting on
// the control stream (it explains a broken data stream), else err.
func (s *source) peerReason(ctlStream *transport.Stream, err error) error {
	ctlStream.SetReadDeadline(time.Now().Add(2 * time.Second))
	defer ctlStream.SetReadDeadline(time.Time{})
	if m, rerr := s.ctl.Recv(); rerr == nil && m.GetAbort() != nil {
		return fmt.Errorf("%w: %s", ErrAborted, m.GetAbort().GetReason())
	}
	return err
}

// deadline bounds the stream's reads and writes by timeout and by ctx;
// the returned func lifts it.
func deadline(ctx context.Context, st *transport.Stream, timeout time.Duration) func() {
	st.SetDeadline(time.Now().Add(timeout))
	if ctx.Err() != nil {
		// AfterFunc would run later, in its own goroutine.
		st.SetDeadline(time.Now())
	}
	stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
	return func() {
		stop()
		st.SetDeadline(time.Time{})
	}
}

func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func optionsToWire(o criu.Options) *wire.CriuOptions {
	return &wire.CriuOptions{TcpEstablished: o.TCPEstablished, FileLocks: o.FileLocks, ExtUnixSk: o.ExtUnixSk,
		ShellJob: o.ShellJob, LinkRemap: o.LinkRemap, GhostLimit: o.GhostLimit, ManageCgroups: o.ManageCgroups}
}

func optionsFromWire(w *wire.CriuOptions) criu.Options {
	return criu.Options{TCPEstablished: w.GetTcpEstablished(), FileLocks: w.GetFileLocks(), ExtUnixSk: w.GetExtUnixSk(),
		ShellJob: w.GetShellJob(), LinkRemap: w.GetLinkRemap(), GhostLimit: w.GetGhostLimit(), ManageCgroups: w.GetManageCgroups()}
}

// removeNetworkLock deletes the nftables table CRIU's dump locked the
// tree's connections with, once the destination runs the tree: CRIU keeps
// it after a dump that kills the tree, for the restore elsewhere, and
// leaves it forever (every packet of the host crosses its chains, every
// later dump walks it). A tree with a network namespace of its own had the
// lock inside it, gone with the tree; phaul then finds no such table in
// its own namespace, the tree's former host one.
func (s *source) removeNetworkLock(name string) {
	if name == "" {
		return
	}
	t := linux.NftTable{Family: "inet", Name: name}
	switch err := linux.DeleteNftTable(t); {
	case err == nil:
		s.log.Info("removed CRIU's network lock", "table", t.String())
	case errors.Is(err, fs.ErrNotExist):
	default:
		s.log.Warn("network lock: remove CRIU's table", "table", t.String(), "err", err)
	}
}

// networkLockTable names the nftables table (family inet) CRIU's dump in
// imagesDir locked the tree's network with; "" if none or unknown.
func networkLockTable(imagesDir string) string {
	inv, err := images.ReadInventory(imagesDir)
	if err != nil || inv.NetworkLock != 1 || inv.RunID == "" { // 1: nftables, in the image's enum
		return ""
	}
	return images.NftLockTable(inv.RunID)
}

// absPath is p made absolute, or p when that fails.
func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

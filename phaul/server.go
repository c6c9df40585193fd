package phaul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"sync"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
)

// ErrBusy is the refusal reason when MaxMigrations are in progress.
var ErrBusy = errors.New("phaul: destination busy")

var migrationIDRe = regexp.MustCompile(`^[0-9a-f]{16}$`)

// Server is the destination service: it accepts migrations, restores them
// and runs them on COMMIT.
type Server struct {
	cfg    ServeConfig
	log    *slog.Logger
	crit   *criu.Binary
	policy RestorePolicy // what a source may have restored here
	mem    memBudget     // what prefaults hold, all migrations together
	// helperExe is the phaul binary that runs lazy-pages helpers.
	helperExe string

	mu        sync.Mutex
	active    map[string]*incoming // guarded by mu
	inDoubt   map[string]int       // migration id -> stopped root pid; guarded by mu
	dropped   recentIDs            // migrations dropped before COMMIT; guarded by mu
	sessions  map[string]int       // open sessions by peer (peerKey); guarded by mu
	nsessions int                  // open sessions in all; guarded by mu
}

// Serve listens and serves migrations until ctx ends. On return every
// migration has finished, been aborted, or been left in doubt (reported in
// the log and in its work dir's state file).
func Serve(ctx context.Context, cfg ServeConfig) error {
	s, tcfg, err := newServer(ctx, cfg)
	if err != nil {
		return err
	}
	ln, err := transport.Listen(ctx, cfg.Listen, tcfg)
	if err != nil {
		return err
	}
	defer ln.Close()
	adopted := s.recoverJournal() // before anyone is told it serves
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, in := range adopted {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.finishAdopted(in)
		}()
	}
	s.log.Info("serving", "addr", ln.Addr().String(), "work_dir", cfg.WorkDir)
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr())
	}
	for {
		sess, err := ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				s.log.Info("stopping", "in_flight", s.count())
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

// newServer checks cfg and the host (CRIU, work dir, cgroup parent, TLS
// identity, restore policy) and returns the service and its listener's
// transport config.
func newServer(ctx context.Context, cfg ServeConfig) (*Server, transport.Config, error) {
	var tcfg transport.Config
	if err := cfg.Validate(); err != nil {
		return nil, tcfg, err
	}
	log := discardIfNil(cfg.Logger)
	id, err := transport.LoadTLS(cfg.TLSDir)
	if err != nil {
		return nil, tcfg, fmt.Errorf("tls dir: %w", err)
	}
	if !id.Serves() {
		return nil, tcfg, fmt.Errorf("tls dir: %s's certificate is for a source only (phaul certs --role destination or both)", cfg.TLSDir)
	}
	bin, err := criu.Locate(ctx, cfg.CRIUPath, log)
	if err != nil {
		return nil, tcfg, err
	}
	log.Info("using criu", "path", bin.Path, "from", bin.Source, "version", bin.Version.String())
	if err := privateDir(cfg.WorkDir); err != nil {
		return nil, tcfg, fmt.Errorf("work dir: %w", err)
	}
	if err := writable(cfg.WorkDir); err != nil {
		return nil, tcfg, fmt.Errorf("work dir: %w", err)
	}
	if err := cgroup.CheckParent(cfg.CgroupParent); err != nil {
		return nil, tcfg, fmt.Errorf("--cgroup-parent: %w", err)
	}
	if err := linux.HaveUserfaultfd(); cfg.LazyRestore && err != nil {
		log.Warn("--lazy-restore: restores write all memory here: no userfaultfd", "err", err)
	}
	policy := DefaultRestorePolicy()
	if cfg.RestorePolicy != "" {
		if policy, err = LoadRestorePolicy(cfg.RestorePolicy); err != nil {
			return nil, tcfg, err
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, tcfg, fmt.Errorf("lazy-pages helper: %w", err)
	}
	tcfg = cfg.Transport
	tcfg.Identity, tcfg.Logger, tcfg.Peers = id, log, cfg.peerPolicy()
	if cfg.AllowAnyPeer {
		log.Warn("--allow-any-peer: every certificate of the CA may migrate a tree here and have it restored as root")
	}
	return &Server{cfg: cfg, log: log, crit: bin, policy: policy, helperExe: exe, mem: memBudget{limit: cfg.MemoryBudget},
		active: map[string]*incoming{}, inDoubt: map[string]int{}, sessions: map[string]int{}}, tcfg, nil
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
	// One source cannot take every slot, and migrations left in doubt
	// (each holds a rebuilt tree and its memory) are capped: the
	// operator resolves them first (phaul gc --resolved).
	peer := peerKey(in.sess)
	n := 0
	for _, o := range s.active {
		if peerKey(o.sess) == peer {
			n++
		}
	}
	if n >= s.cfg.MaxMigrationsPerPeer {
		return fmt.Errorf("%w: %d migrations of this source in progress (--max-migrations-per-peer)", ErrBusy, n)
	}
	if len(s.inDoubt) >= s.cfg.MaxInDoubt {
		return fmt.Errorf("%w: %d migrations in doubt here; resolve them first (phaul gc --resolved)", ErrBusy, len(s.inDoubt))
	}
	s.active[in.id] = in
	return nil
}

// peerKey names a session's source by its certificate's serial.
func peerKey(sess *transport.Session) string {
	if sess == nil || sess.Peer().Cert == nil {
		return ""
	}
	return transport.SerialString(sess.Peer().Cert.SerialNumber)
}

func (s *Server) forget(in *incoming) {
	in.reserve.Release() // whatever path the migration took
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.active, in.id)
}

// openSession counts sess against its source's session bound and the
// bound of all; it says why not when either is reached.
func (s *Server) openSession(sess *transport.Session) error {
	peer := peerKey(sess)
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.sessions[peer]; n >= s.cfg.MaxSessionsPerPeer {
		return fmt.Errorf("too many sessions of this source (--max-sessions-per-peer): %d open", n)
	}
	if s.nsessions >= s.cfg.MaxSessions {
		return fmt.Errorf("too many sessions (--max-sessions): %d open", s.nsessions)
	}
	s.sessions[peer]++
	s.nsessions++
	return nil
}

func (s *Server) closeSession(sess *transport.Session) {
	peer := peerKey(sess)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nsessions--
	if s.sessions[peer]--; s.sessions[peer] == 0 {
		delete(s.sessions, peer)
	}
}

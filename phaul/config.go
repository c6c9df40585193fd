package phaul

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/phaul/phaul/core/criu"
	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/pageserver"
)

// MigrateConfig configures the source side of one migration.
type MigrateConfig struct {
	To       string // destination HOST:PORT; its certificate must name HOST
	TLSDir   string // ca.crt, node.crt, node.key; a dir holding ca.key is refused
	Mode     Mode
	PID      int    // root of the tree to move
	WorkDir  string // images are written under WorkDir/<migration id>, removed afterwards
	CRIUPath string // --criu; empty: $PHAUL_CRIU, the prefix wrapper, PATH
	CRIU     criu.Options
	Compress string // page stream compression: auto (default), on, off
	// PageStreams: the yamux streams (lanes) pages are spread over, each
	// compressing and writing its batches in parallel; 1 to
	// pageserver.MaxLanes.
	PageStreams int
	// Pre-copy: the dirty-page tracker (dirty.Kind*, "auto"), the downtime
	// to aim for, the fixed part of the downtime floor (what the frozen
	// tree spends in CRIU's dump and restore and the commit whatever its
	// memory; the part that grows with the memory is measured on the
	// destination before round 1), and the most rounds before freezing
	// anyway.
	Tracker        string
	FinalDump      string // "lazy" (default) or "full"; see FinalDump*
	DowntimeTarget time.Duration
	DowntimeFloor  time.Duration
	MaxRounds      int
	// HybridRounds bounds hybrid's pre-copy rounds (the dirty set left
	// then moves after the resume).
	HybridRounds int
	// AutoConverge throttles a tree that dirties memory faster than the
	// link carries it (cgroup v1 cpu controller, a group phaul creates):
	// 20% of its CPU first, 10% more each time it stays too fast.
	AutoConverge bool
	// Prefault has the destination fill and hold the tree's memory once
	// the rounds are done, rounds again, and free it just before the
	// freeze, so that the restore reuses it.
	Prefault bool
	DumpLock string // host-wide lock file serialising CRIU dumps
	// DumpLockTimeout bounds the wait for another migration's dump.
	DumpLockTimeout time.Duration

	Transport transport.Config // Identity is loaded from TLSDir
	Logger    *slog.Logger
	Progress  Progress

	// HelloTimeout bounds the hello exchange; PrepareTimeout how long the
	// frozen tree waits for PREPARED; CommitTimeout how long the source
	// waits for COMMITTED before declaring the migration in doubt.
	HelloTimeout   time.Duration
	PrepareTimeout time.Duration
	CommitTimeout  time.Duration
	// PostcopyRecoverTimeout: after the destination resumed, how long the
	// source keeps its held tree and tries to reconnect when the
	// connection is lost, before it gives post-copy up.
	PostcopyRecoverTimeout time.Duration
}

// notSentLowat bounds what the kernel queues unsent on the migration's
// socket, so control messages wait behind little bulk data (measured in
// core/transport/doc.go: 45 ms down to 8 ms on a 200 Mbit/s link).
const notSentLowat = 16 << 10

func defaultTransport() transport.Config {
	c := transport.DefaultConfig()
	c.Control = linux.SetTCPNotSentLowat(notSentLowat)
	return c
}

// How pre-copy's final dump runs. Lazy: CRIU's lazy dump freezes the tree
// without copying its anonymous memory and holds it while phaul reads the
// last dirty pages itself; full: CRIU dumps all memory into phaul's page
// server, which sends only what the destination lacks.
const (
	FinalDumpLazy = "lazy"
	FinalDumpFull = "full"
)

// DefaultMigrateConfig returns a cold migration config with defaults set.
func DefaultMigrateConfig() MigrateConfig {
	return MigrateConfig{
		Mode:           ModePrecopy,
		PageStreams:    2,
		Tracker:        dirty.KindAuto,
		FinalDump:      FinalDumpLazy,
		DowntimeTarget: 300 * time.Millisecond,
		DowntimeFloor:  150 * time.Millisecond,
		MaxRounds:      30,
		HybridRounds:   5,
		Prefault:       true,
		WorkDir:        "/var/lib/phaul/source",
		DumpLock:       "/run/phaul/dump.lock",

		DumpLockTimeout: 5 * time.Minute,
		Transport:       defaultTransport(),
		HelloTimeout:    30 * time.Second,
		PrepareTimeout:  10 * time.Minute,
		CommitTimeout:   time.Minute,

		PostcopyRecoverTimeout: time.Minute,
	}
}

// Validate reports every problem with c.
func (c MigrateConfig) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.To); err != nil || c.To == "" {
		errs = append(errs, fmt.Errorf("--to %q: want HOST:PORT", c.To))
	}
	if c.TLSDir == "" {
		errs = append(errs, errors.New("--tls-dir is required"))
	}
	if c.PID <= 0 {
		errs = append(errs, fmt.Errorf("pid %d: want a positive process id", c.PID))
	}
	if _, err := ParseMode(string(c.Mode)); err != nil {
		errs = append(errs, err)
	}
	if c.WorkDir == "" {
		errs = append(errs, errors.New("work dir is required"))
	}
	if c.DumpLock == "" || !filepath.IsAbs(c.DumpLock) || c.DumpLockTimeout <= 0 {
		errs = append(errs, errors.New("dump lock: an absolute path and a positive timeout are required"))
	}
	if err := c.CRIU.Validate(); err != nil {
		errs = append(errs, err)
	}
	switch c.Compress {
	case "", "auto", "on", "off":
	default:
		errs = append(errs, fmt.Errorf("--compress %q: want auto, on or off", c.Compress))
	}
	if c.Mode.rounds() {
		if c.Tracker != dirty.KindAuto && c.Tracker != "" {
			if err := dirty.Available(c.Tracker); err != nil {
				errs = append(errs, fmt.Errorf("--tracker: %w", err))
			}
		}
		if c.FinalDump != FinalDumpLazy && c.FinalDump != FinalDumpFull {
			errs = append(errs, fmt.Errorf("--final-dump %q: want lazy or full", c.FinalDump))
		}
		if c.DowntimeTarget <= 0 || c.DowntimeFloor < 0 || c.MaxRounds < 1 || c.HybridRounds < 1 {
			errs = append(errs, errors.New("--downtime-target, --max-rounds and --hybrid-rounds must be positive"))
		}
	}
	if c.PageStreams < 1 || c.PageStreams > pageserver.MaxLanes {
		errs = append(errs, fmt.Errorf("--page-streams %d: want 1 to %d", c.PageStreams, pageserver.MaxLanes))
	}
	if c.HelloTimeout <= 0 || c.PrepareTimeout <= 0 || c.CommitTimeout <= 0 || c.PostcopyRecoverTimeout <= 0 {
		errs = append(errs, errors.New("timeouts must be positive"))
	}
	return errors.Join(errs...)
}

// ServeConfig configures the destination service.
type ServeConfig struct {
	Listen   string // ADDR:PORT
	WorkDir  string // migrations live in WorkDir/<migration id>
	TLSDir   string
	CRIUPath string

	Transport transport.Config // Identity is loaded from TLSDir; Peers from the fields below
	Limits    images.Limits

	// AllowPeers names the sources this service admits (a certificate of
	// the CA must name one in its subject alternative names); AllowAnyPeer
	// admits every certificate of the CA instead. One of them is required.
	// DenyList is a file of revoked certificate serials, read again when it
	// changes.
	AllowPeers   []string
	AllowAnyPeer bool
	DenyList     string
	// RestorePolicy is the file of the restore policy (RestorePolicy);
	// "" is DefaultRestorePolicy.
	RestorePolicy string
	Logger        *slog.Logger

	// MaxMigrations bounds the migrations in progress at once,
	// MaxMigrationsPerPeer those of one source (certificate), and
	// MaxInDoubt the migrations left in doubt here before new ones are
	// refused.
	MaxMigrations        int
	MaxMigrationsPerPeer int
	// MaxSessionsPerPeer bounds the authenticated sessions of one source
	// (certificate) open at once, whatever they do (a resumed post-copy
	// and its migration count apart); one beyond it is closed at once.
	MaxSessionsPerPeer int
	// MaxSessions bounds the authenticated sessions open at once, of all
	// sources.
	MaxSessions int
	MaxInDoubt  int
	// HelloTimeout bounds the wait for a new session's hello;
	// StepTimeout the wait for each later source message before PREPARED.
	HelloTimeout time.Duration
	StepTimeout  time.Duration
	// MaxMigrationTime bounds, from the hello on, the part of a
	// migration the source drives before PREPARED (rounds, transfer):
	// pings renew StepTimeout, never past it. Past it the migration is
	// aborted (the source's copy runs on).
	MaxMigrationTime time.Duration
	// MemoryBudget bounds the memory the prefaults of all migrations hold
	// at once (0: half of what is available).
	MemoryBudget uint64
	// DiskBudget bounds the bytes all migrations' directories hold (0:
	// none); MinFreeDisk is what the work dir's filesystem must keep
	// free. A migration is refused, or aborted while it receives, when
	// either is crossed.
	DiskBudget  uint64
	MinFreeDisk uint64
	// RestoreTimeout bounds CRIU's restore (a restore can block, e.g. on a
	// file lock another process holds); past it the restore is killed and
	// the migration aborted.
	RestoreTimeout time.Duration
	// CommitWait is how long a PREPARED migration waits for COMMIT or ABORT
	// after its connection is lost or the service is told to stop, before
	// it is left in doubt.
	CommitWait time.Duration

	// CgroupParent is where a restored tree lives once committed: a cgroup
	// path below the root of the freezer v1 and cgroup v2 hierarchies
	// ("/" for the roots), which must exist in each. Until COMMIT the tree
	// is in phaul/<migration id>, which then goes. With --manage-cgroups
	// the tree is in its own cgroups instead.
	CgroupParent string
	// LazyRestore has CRIU restore the tree without writing the pages its
	// images mark lazy, which a lazy-pages daemon (package lazy) fills
	// from the images once the tree runs: the freeze no longer includes
	// writing the tree's memory. Off, or without userfaultfd, the restore
	// writes all of it. On by default: a tree held in doubt gets all of
	// its memory before it is recorded, and outlives the service.
	LazyRestore bool
	// PostcopyRecoverTimeout is how long a post-copy whose connection was
	// lost waits for its source to reconnect; the restored tree's threads
	// that touch a missing page wait meanwhile.
	PostcopyRecoverTimeout time.Duration

	// Ready, if set, is called once with the listening address.
	Ready func(net.Addr)
}

// DefaultServeConfig returns a ServeConfig with defaults set.
func DefaultServeConfig() ServeConfig {
	return ServeConfig{
		WorkDir:       "/var/lib/phaul",
		Transport:     transport.DefaultConfig(),
		Limits:        images.DefaultLimits(),
		MaxMigrations: 8,

		MaxMigrationsPerPeer: 4,
		MaxSessionsPerPeer:   16,
		MaxSessions:          64,
		MaxInDoubt:           4,
		HelloTimeout:         30 * time.Second,
		StepTimeout:          10 * time.Minute,
		MaxMigrationTime:     time.Hour,
		MinFreeDisk:          1 << 30,
		RestoreTimeout:       5 * time.Minute,
		CommitWait:           30 * time.Second,
		CgroupParent:         "/",
		LazyRestore:          true,

		PostcopyRecoverTimeout: time.Minute,
	}
}

// Validate reports every problem with c.
func (c ServeConfig) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("--listen %q: want ADDR:PORT", c.Listen))
	}
	if c.WorkDir == "" {
		errs = append(errs, errors.New("--work-dir is required"))
	}
	if c.TLSDir == "" {
		errs = append(errs, errors.New("--tls-dir is required"))
	}
	if c.MaxMigrations <= 0 || c.MaxMigrationsPerPeer <= 0 || c.MaxInDoubt <= 0 || c.MaxSessionsPerPeer <= 0 || c.MaxSessions <= 0 {
		errs = append(errs, errors.New("max migrations (in all, per peer, in doubt) must be positive"))
	}
	if c.HelloTimeout <= 0 || c.StepTimeout <= 0 || c.RestoreTimeout <= 0 || c.CommitWait <= 0 || c.PostcopyRecoverTimeout <= 0 ||
		c.MaxMigrationTime <= 0 {
		errs = append(errs, errors.New("timeouts must be positive"))
	}
	if !filepath.IsAbs(c.CgroupParent) || strings.Contains(c.CgroupParent, "..") {
		errs = append(errs, fmt.Errorf("--cgroup-parent %q: want an absolute cgroup path", c.CgroupParent))
	}
	if err := c.peerPolicy().Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func discardIfNil(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

// peerPolicy is the sources this service admits.
func (c ServeConfig) peerPolicy() *transport.PeerPolicy {
	return &transport.PeerPolicy{Allow: c.AllowPeers, AnyPeer: c.AllowAnyPeer, DenyFile: c.DenyList}
}

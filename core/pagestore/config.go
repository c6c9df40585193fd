package pagestore

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/phaul/phaul/core/linux"
)

const (
	// DefaultMaxBytes is Config.MaxBytes when zero: 64 GiB of page data.
	DefaultMaxBytes = 64 << 30
	// DefaultMaxPages is Config.MaxPages when zero: 2^26 pages (256 GiB of
	// address space).
	DefaultMaxPages = 1 << 26
	// DefaultMaxIndexBytes is Config.MaxIndexBytes when zero: 512 MiB,
	// DefaultMaxPages recorded densely. Sparse pages cost a chunk of index
	// each (4 KiB for 2 MiB of address space): without this bound 2^26
	// pages one per chunk would take 256 GiB.
	DefaultMaxIndexBytes = 512 << 20
)

// Config configures a Store.
type Config struct {
	// Dir is the images directory: Commit writes pagemap-*.img and
	// pages-*.img there, beside CRIU's other images. It is created on
	// Commit if missing.
	Dir string
	// SpoolDir holds the spool file until Close; "" means Dir + ".partial".
	SpoolDir string
	// MaxBytes bounds the page data held (bytes of non-zero present pages);
	// 0 means DefaultMaxBytes.
	MaxBytes uint64
	// MaxPages bounds the pages recorded, of every kind (zero, lazy and
	// parent pages included); 0 means DefaultMaxPages.
	MaxPages uint64
	// MaxIndexBytes bounds the index the store keeps for the pages it
	// records (chunks of 512 slots, 4 KiB each); 0 means
	// DefaultMaxIndexBytes.
	MaxIndexBytes uint64
	// Logger receives debug and info lines; nil discards them.
	Logger *slog.Logger
	// NoSync skips the fsyncs of Commit: for images consumed at once by a
	// restore whose failure aborts anyway (a migration's destination),
	// where durability buys nothing and fsync of the pages costs seconds.
	NoSync bool
	// Levels lets Commit write a task's pages as two levels when its
	// spool lost image order (pre-copy: a page first sent after round 1
	// lies below pages sent before it, or a page left the final set):
	// the spool as it was when the order broke becomes the parent level
	// (Dir/parent/, linked, not copied) and the top level holds only the
	// pages that moved since, with PE_PARENT entries for the rest.
	Levels bool
}

// DefaultConfig returns a Config for images dir with the default limits.
func DefaultConfig(dir string) Config {
	return Config{Dir: dir, MaxBytes: DefaultMaxBytes, MaxPages: DefaultMaxPages}
}

// Validate reports every problem with c.
func (c Config) Validate() error {
	var errs []error
	if c.Dir == "" {
		errs = append(errs, errors.New("dir is empty"))
	}
	if c.MaxPages > MaxAddr/PageSize {
		errs = append(errs, fmt.Errorf("max pages %d above the address space (%d)", c.MaxPages, uint64(MaxAddr/PageSize)))
	}
	if c.SpoolDir != "" && c.Dir != "" && filepath.Clean(c.SpoolDir) == filepath.Clean(c.Dir) {
		errs = append(errs, errors.New("spool dir is the images dir"))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pagestore config: %w", err)
	}
	return nil
}

// withDefaults fills the zero fields.
func (c Config) withDefaults() Config {
	if c.SpoolDir == "" {
		c.SpoolDir = stagingDir(c.Dir)
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	if c.MaxPages == 0 {
		c.MaxPages = DefaultMaxPages
	}
	if c.MaxIndexBytes == 0 {
		c.MaxIndexBytes = DefaultMaxIndexBytes
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// stagingDir is where Commit writes before moving into dir.
func stagingDir(dir string) string { return filepath.Clean(dir) + ".partial" }

// makeOwnDir is linux.PrivateDir: the staging and spool directories sit
// beside the images dir, where a local user could have planted a link
// that the store (root) would then write through.
func makeOwnDir(dir string) error { return linux.PrivateDir(dir) }

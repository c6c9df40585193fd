package lazy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
)

// Source provides page contents.
type Source interface {
	// ReadPages fills buf (a multiple of 4096 bytes) with the pages of
	// task id (CRIU's image id = virtual pid) from vaddr on. The daemon
	// calls it from several goroutines at once, asks only for pages the
	// images mark lazy, and treats any error as fatal: a restored thread
	// may be waiting for those pages. It should return soon once ctx
	// ends: Serve waits for every read.
	ReadPages(ctx context.Context, id uint64, vaddr uint64, buf []byte) error
}

// Remoter is a Source some of whose pages come from far away (another
// host): the daemon accounts faults on those apart (Stats.RemoteFault*).
type Remoter interface {
	// Remote reports whether page vaddr of image id is read from afar.
	Remote(id, vaddr uint64) bool
}

type faultReadKey struct{}

// IsFaultRead reports whether a Source read is for a thread waiting on a
// fault (else it is the background fill's): a Source over the network
// sends those ahead of bulk reads.
func IsFaultRead(ctx context.Context) bool {
	v, _ := ctx.Value(faultReadKey{}).(bool)
	return v
}

// SocketName is the socket CRIU's restore connects to, relative to its
// work dir.
const SocketName = "lazy-pages.socket"

// maxSocketPath is the room in sockaddr_un.sun_path, less the final NUL;
// a longer path is bound through a directory descriptor (ListenIn).
const maxSocketPath = 107

// Config configures a Daemon.
type Config struct {
	// WorkDir is the restore's work dir (criu restore -W, else -D; RPC
	// work_dir_fd): SocketName is created there.
	WorkDir string
	// ImagesDir holds pagemap-<id>.img and mm-<id>.img, which say which
	// ranges are lazy.
	ImagesDir string
	// Source provides the lazy pages.
	Source Source
	// Logger receives the daemon's log; nil discards it.
	Logger *slog.Logger
	// FaultReads bounds the Source reads for faults in flight at once;
	// 0 takes DefaultConfig's.
	FaultReads int
	// MaxChunkBytes bounds one background read: the fill reads 64 KiB
	// after a fault and grows by 64 KiB a read up to this (a multiple of
	// 64 KiB); 0 takes DefaultConfig's.
	MaxChunkBytes int
}

// DefaultConfig returns the tunables' defaults; the caller sets WorkDir,
// ImagesDir and Source.
func DefaultConfig() Config {
	return Config{FaultReads: 4, MaxChunkBytes: 4 << 20}
}

const (
	minChunkBytes = 64 << 10
	maxFaultReads = 256
	maxChunkLimit = 64 << 20
)

// Validate reports every problem of c.
func (c Config) Validate() error {
	var errs []error
	if c.WorkDir == "" {
		errs = append(errs, errors.New("lazy: no WorkDir"))
	} else if fi, err := os.Stat(c.WorkDir); err != nil {
		errs = append(errs, fmt.Errorf("lazy: WorkDir: %w", err))
	} else if !fi.IsDir() {
		errs = append(errs, fmt.Errorf("lazy: WorkDir %s: not a directory", c.WorkDir))
	}
	if c.ImagesDir == "" {
		errs = append(errs, errors.New("lazy: no ImagesDir"))
	}
	if c.Source == nil {
		errs = append(errs, errors.New("lazy: no Source"))
	}
	if c.FaultReads < 0 || c.FaultReads > maxFaultReads {
		errs = append(errs, fmt.Errorf("lazy: FaultReads %d outside 0..%d", c.FaultReads, maxFaultReads))
	}
	if c.MaxChunkBytes < 0 || c.MaxChunkBytes > maxChunkLimit || c.MaxChunkBytes%minChunkBytes != 0 {
		errs = append(errs, fmt.Errorf("lazy: MaxChunkBytes %d not a multiple of 64 KiB up to 64 MiB", c.MaxChunkBytes))
	}
	return errors.Join(errs...)
}

// withDefaults fills the zero tunables.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.FaultReads == 0 {
		c.FaultReads = d.FaultReads
	}
	if c.MaxChunkBytes == 0 {
		c.MaxChunkBytes = d.MaxChunkBytes
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

var (
	// ErrProtocol: CRIU's restore sent something its protocol does not
	// allow (a bad record, a missing or extra descriptor).
	ErrProtocol = errors.New("lazy: restore protocol violation")
	// ErrRestoreEnded: the restore closed the socket before its finish
	// marker; it failed.
	ErrRestoreEnded = errors.New("lazy: restore ended before it finished")
	// ErrImage: an mm image is malformed (pagemap images wrap
	// pagestore.ErrImage).
	ErrImage = errors.New("lazy: malformed image")
	// ErrNoPage: ImageSource was asked for a page its images hold no
	// content for.
	ErrNoPage = errors.New("lazy: page not in the images")
	// ErrServed: Serve was called twice, or after Close.
	ErrServed = errors.New("lazy: daemon already served or closed")
	// ErrDetached: Detach was called twice.
	ErrDetached = errors.New("lazy: daemon already detached")
)

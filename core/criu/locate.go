package criu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"

	"github.com/checkpoint-restore/go-criu/v8/rpc"
)

// PrefixWrapper is where deploy/install-criu.sh puts its CRIU wrapper.
const PrefixWrapper = "/opt/phaul/criu/bin/criu"

// MinVersion is the oldest CRIU phaul accepts: 4.1 cannot dump IPv4/IPv6
// sockets on Linux >= 6.16 and speaks a different page-server header.
var MinVersion = Version{Major: 4, Minor: 2}

// Version is a CRIU release number.
type Version struct {
	Major, Minor, Sub int
	GitID             string `json:",omitempty"`
}

func (v Version) String() string {
	s := fmt.Sprintf("%d.%d", v.Major, v.Minor)
	if v.Sub != 0 {
		s += fmt.Sprintf(".%d", v.Sub)
	}
	if v.GitID != "" {
		s += " (" + v.GitID + ")"
	}
	return s
}

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

// Binary is a CRIU executable that answered a version request.
type Binary struct {
	Path    string  // what phaul executes (may be a wrapper script)
	Source  string  // where it came from: "flag", "env", "prefix" or "PATH"
	Version Version // reported over RPC
	Logger  *slog.Logger
}

// Locate finds CRIU: flagPath if set, then $PHAUL_CRIU, then PrefixWrapper,
// then "criu" on PATH. The first candidate that exists is used (an explicit
// one that does not exist is an error, not skipped). It asks the binary for
// its version over RPC and refuses one older than MinVersion (ErrTooOld).
func Locate(ctx context.Context, flagPath string, log *slog.Logger) (*Binary, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b, err := find(flagPath)
	if err != nil {
		return nil, err
	}
	b.Logger = log
	v, err := b.version(ctx)
	if err != nil {
		return nil, fmt.Errorf("criu at %s (from %s): %w", b.Path, b.Source, err)
	}
	b.Version = v
	if !v.AtLeast(MinVersion.Major, MinVersion.Minor) {
		return b, fmt.Errorf("%w: %s is %s, phaul needs %s or newer (run deploy/install-criu.sh)",
			ErrTooOld, b.Path, v, MinVersion)
	}
	return b, nil
}

func find(flagPath string) (*Binary, error) {
	explicit := []struct{ path, source string }{{flagPath, "flag"}, {os.Getenv("PHAUL_CRIU"), "env"}}
	for _, c := range explicit {
		if c.path == "" {
			continue
		}
		p, err := exec.LookPath(c.path)
		if err != nil {
			return nil, fmt.Errorf("%w: %s %q: %w", ErrNotFound, c.source, c.path, err)
		}
		return &Binary{Path: p, Source: c.source}, nil
	}
	if _, err := os.Stat(PrefixWrapper); err == nil {
		return &Binary{Path: PrefixWrapper, Source: "prefix"}, nil
	}
	p, err := exec.LookPath("criu")
	if err != nil {
		return nil, fmt.Errorf("%w: no --criu, no $PHAUL_CRIU, no %s, none on PATH (run deploy/install-criu.sh)",
			ErrNotFound, PrefixWrapper)
	}
	return &Binary{Path: p, Source: "PATH"}, nil
}

func (b *Binary) logger() *slog.Logger {
	if b.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return b.Logger
}

// simple runs a request that needs no directories and no notifications.
func (b *Binary) simple(ctx context.Context, action string, typ rpc.CriuReqType) (*rpc.CriuResp, error) {
	s, err := b.start(ctx, action, Hooks{}, b.logger())
	if err != nil {
		return nil, err
	}
	req := &rpc.CriuReq{Type: typ.Enum()}
	if typ == rpc.CriuReqType_CHECK {
		// CHECK reads opts for its log settings; CRIU requires images_dir_fd.
		req.Opts = &rpc.CriuOpts{ImagesDirFd: int32p(-1), LogLevel: int32p(2), LogToStderr: boolp(true)}
	}
	resp, err := s.call(ctx, req, nil)
	if err != nil || !resp.GetSuccess() {
		return nil, s.fail(resp, err, "")
	}
	s.finish()
	return resp, nil
}

func (b *Binary) version(ctx context.Context) (Version, error) {
	resp, err := b.simple(ctx, "version", rpc.CriuReqType_VERSION)
	if err != nil {
		return Version{}, err
	}
	v := resp.GetVersion()
	if v == nil {
		return Version{}, errors.New("version response without version")
	}
	return Version{Major: int(v.GetMajorNumber()), Minor: int(v.GetMinorNumber()),
		Sub: int(v.GetSublevel()), GitID: v.GetGitid()}, nil
}

// Check runs `criu check` over RPC. A failure is an *Error whose LogTail
// says what CRIU found missing.
func (b *Binary) Check(ctx context.Context) error {
	_, err := b.simple(ctx, "check", rpc.CriuReqType_CHECK)
	return err
}

func int32p(v int32) *int32    { return &v }
func uint32p(v uint32) *uint32 { return &v }
func boolp(v bool) *bool       { return &v }
func strp(v string) *string    { return &v }

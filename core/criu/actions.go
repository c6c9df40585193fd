package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/checkpoint-restore/go-criu/v8/rpc"
)

// Options are the CRIU options a workload may need; a migration carries the
// same set to the dump and to the restore.
type Options struct {
	TCPEstablished bool   `json:"tcp_established,omitempty"`
	FileLocks      bool   `json:"file_locks,omitempty"`
	ExtUnixSk      bool   `json:"ext_unix_sk,omitempty"`
	ShellJob       bool   `json:"shell_job,omitempty"`
	LinkRemap      bool   `json:"link_remap,omitempty"`
	GhostLimit     uint64 `json:"ghost_limit,omitempty"`    // bytes; 0: CRIU's default (1 MiB)
	ManageCgroups  string `json:"manage_cgroups,omitempty"` // "" (phaul's default: ignore) or a CgroupModes key
}

// CgroupModes maps --manage-cgroups names to CRIU's modes.
var CgroupModes = map[string]rpc.CriuCgMode{
	"ignore": rpc.CriuCgMode_IGNORE,
	"none":   rpc.CriuCgMode_CG_NONE,
	"props":  rpc.CriuCgMode_PROPS,
	"soft":   rpc.CriuCgMode_SOFT,
	"full":   rpc.CriuCgMode_FULL,
	"strict": rpc.CriuCgMode_STRICT,
}

// MaxGhostLimit bounds GhostLimit: CRIU takes a u32.
const MaxGhostLimit = 1<<32 - 1

// Validate reports every invalid option.
func (o Options) Validate() error {
	var errs []string
	if o.ManageCgroups != "" {
		if _, ok := CgroupModes[o.ManageCgroups]; !ok {
			errs = append(errs, fmt.Sprintf("manage-cgroups %q: want one of ignore, none, props, soft, full, strict", o.ManageCgroups))
		}
	}
	if o.GhostLimit > MaxGhostLimit {
		errs = append(errs, fmt.Sprintf("ghost-limit %d: above %d", o.GhostLimit, uint64(MaxGhostLimit)))
	}
	if len(errs) > 0 {
		return fmt.Errorf("criu options: %s", strings.Join(errs, "; "))
	}
	return nil
}

func (o Options) apply(opts *rpc.CriuOpts) {
	opts.TcpEstablished = boolp(o.TCPEstablished)
	opts.FileLocks = boolp(o.FileLocks)
	opts.ExtUnixSk = boolp(o.ExtUnixSk)
	opts.ShellJob = boolp(o.ShellJob)
	opts.LinkRemap = boolp(o.LinkRemap)
	if o.GhostLimit > 0 {
		opts.GhostLimit = uint32p(uint32(o.GhostLimit))
	}
	mode := rpc.CriuCgMode_IGNORE
	if m, ok := CgroupModes[o.ManageCgroups]; ok {
		mode = m
	}
	opts.ManageCgroupsMode = &mode
}

// DumpRequest describes one dump.
type DumpRequest struct {
	Pid       int    // root of the tree
	ImagesDir string // must exist and be empty
	WorkDir   string // log goes here; defaults to ImagesDir
	Options
	LeaveRunning bool
	LogLevel     int // 0: 4 (debug), enough for post-mortems
	// PageServer, if set, is a connected socket CRIU streams the pages
	// into, speaking the page-server protocol (RPC ps.fd, CRIU's
	// --ps-socket): no listening socket another local process could reach
	// first. CRIU then writes no pagemap or pages images locally and ends
	// the session with FORCE_CLOSE. The caller keeps ownership.
	PageServer *os.File
	// LazySocket, when set, makes a lazy dump (CRIU's --lazy-pages):
	// lazy-capable memory is not copied (the pagemaps mark it PE_LAZY
	// without data), other pages go to local images, and once post-dump
	// is answered with success CRIU serves this connected socket as the
	// lazy page server (its --ps-socket), holding the tree frozen until
	// the session ends: CLOSE or EOF kills the tree; a command CRIU
	// rejects, or CRIU's death, resumes it. No listener another local
	// process could reach first. PageServer must be nil.
	LazySocket *os.File
	// LazyPeer, if set, is inherited by CRIU and never used: a copy of the
	// caller's own end of LazySocket, so that the caller's death is no EOF
	// (which would end the session cleanly and kill the tree): CRIU then
	// holds the tree until it is told, or killed.
	LazyPeer *os.File
	// Started, if set, gets CRIU's pid once it runs.
	Started func(pid int) error
}

// Dump checkpoints a tree. Notifications go to n (nil: all succeed). With the
// default final state the tree is killed once post-dump succeeds; a failed
// notification makes CRIU roll back and resume the tree. The network is
// locked with nftables.
func (b *Binary) Dump(ctx context.Context, r DumpRequest, n Notifier) error {
	opts := &rpc.CriuOpts{
		Pid:          int32p(int32(r.Pid)),
		LeaveRunning: boolp(r.LeaveRunning),
		NetworkLock:  rpc.CriuNetworkLockMethod_NFTABLES.Enum(),
	}
	r.Options.apply(opts)
	hooks := Hooks{Started: r.Started}
	switch {
	case r.LazySocket != nil && r.PageServer != nil:
		return errors.New("dump: a lazy dump takes no page-server socket")
	case r.LazySocket != nil:
		hooks.ExtraFiles = []*os.File{r.LazySocket} // fd 4
		if r.LazyPeer != nil {
			hooks.ExtraFiles = append(hooks.ExtraFiles, r.LazyPeer)
		}
		// Over RPC CRIU ignores ps.fd in lazy mode; its config file is
		// read as its command line.
		conf, err := lazyConfig(r.ImagesDir, 4)
		if err != nil {
			return err
		}
		defer os.Remove(conf)
		opts.LazyPages = boolp(true)
		opts.ConfigFile = strp(conf)
	case r.PageServer != nil:
		hooks.ExtraFiles = []*os.File{r.PageServer}
		opts.Ps = &rpc.CriuPageServerInfo{Fd: int32p(4)} // first extra file
	}
	_, err := b.action(ctx, "dump", rpc.CriuReqType_DUMP, r.ImagesDir, r.WorkDir, r.LogLevel, opts, n, hooks)
	return err
}

// lazyConfig writes the CRIU config file that hands a lazy dump its
// page-server socket (fd in CRIU) and returns its path.
func lazyConfig(imagesDir string, fd int) (string, error) {
	// Beside the images dir, not in it: it is no image.
	path := filepath.Clean(imagesDir) + ".criu-lazy.conf"
	if err := os.WriteFile(path, []byte(fmt.Sprintf("ps-socket %d\n", fd)), 0o600); err != nil {
		return "", fmt.Errorf("dump: lazy config: %w", err)
	}
	return path, nil
}

// RestoreRequest describes one restore.
type RestoreRequest struct {
	ImagesDir string
	WorkDir   string
	Options
	// LazyPages leaves the pages the images mark lazy (PE_LAZY) to a
	// lazy-pages daemon listening on lazy-pages.socket in WorkDir, which
	// gets every task's userfaultfd.
	LazyPages bool
	LogLevel  int
	// Hooks.Started runs before CRIU forks the tree: restored tasks inherit
	// the cgroups CRIU is in when the mode is ignore.
	Hooks Hooks
}

// Restore restores a tree detached from CRIU and returns the host pid of its
// root task.
func (b *Binary) Restore(ctx context.Context, r RestoreRequest, n Notifier) (int, error) {
	opts := &rpc.CriuOpts{
		LazyPages:   boolp(r.LazyPages),
		NetworkLock: rpc.CriuNetworkLockMethod_NFTABLES.Enum(),
	}
	r.Options.apply(opts)
	resp, err := b.action(ctx, "restore", rpc.CriuReqType_RESTORE, r.ImagesDir, r.WorkDir, r.LogLevel, opts, n, r.Hooks)
	if err != nil {
		return 0, err
	}
	pid := int(resp.GetRestore().GetPid())
	if pid <= 0 {
		return 0, &Error{Action: "restore", ExitCode: 0, Err: fmt.Errorf("response carries no pid")}
	}
	return pid, nil
}

// action runs one dump or restore in a fresh swrk child.
func (b *Binary) action(ctx context.Context, action string, typ rpc.CriuReqType, imagesDir, workDir string,
	level int, opts *rpc.CriuOpts, n Notifier, hooks Hooks) (*rpc.CriuResp, error) {
	if workDir == "" {
		workDir = imagesDir
	}
	if level == 0 {
		level = 4
	}
	// CRIU opens work_dir_fd as /proc/<our pid>/fd/<n>: it must stay open in
	// this process until CRIU is done.
	wd, err := os.Open(workDir)
	if err != nil {
		return nil, &Error{Action: action, ExitCode: -1, Err: fmt.Errorf("open work dir: %w", err)}
	}
	defer wd.Close()
	logName := action + ".log"
	opts.ImagesDirFd = int32p(-1)
	opts.ImagesDir = strp(imagesDir)
	opts.WorkDirFd = int32p(int32(wd.Fd()))
	opts.LogFile = strp(logName)
	opts.LogLevel = int32p(int32(level))
	opts.NotifyScripts = boolp(n != nil)

	s, err := b.start(ctx, action, hooks, b.logger())
	if err != nil {
		return nil, err
	}
	resp, err := s.call(ctx, &rpc.CriuReq{Type: typ.Enum(), Opts: opts}, n)
	if err != nil || !resp.GetSuccess() {
		return resp, s.fail(resp, err, logPath(workDir, logName))
	}
	if code, werr := s.finish(); werr != nil && code != 0 {
		// CRIU answered success but exited badly: trust the answer, which
		// is what the tree's state follows, and log the exit.
		b.logger().Warn("criu exited badly after success", "action", action, "exit", code, "err", werr)
	}
	return resp, nil
}

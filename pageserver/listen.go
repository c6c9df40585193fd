package pageserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
)

// RunConfig configures the standalone page server, `phaul page-server`.
type RunConfig struct {
	// Listen is ADDR:PORT (port 0 picks one). Without TLSDir, ADDR must
	// be a loopback IP literal or "localhost" (ErrInsecureListen).
	Listen string
	// ImagesDir receives pagemap-*.img and pages-*.img at the end of a
	// session; it may be CRIU's own -D directory. It must not hold page
	// images already.
	ImagesDir string
	// TLSDir holds ca.crt, node.crt and node.key (phaul certs) and never
	// ca.key; "" serves plain TCP.
	TLSDir string
	// Peers says which clients of the CA a TLS page server admits
	// (required with TLSDir: --allow-peer NAME or --allow-any-peer).
	Peers *transport.PeerPolicy
	// Keep serves sessions until ctx ends. Without it Serve returns after
	// the first session that ends with CLOSE, like criu page-server. The
	// store takes pages until its first commit; later sessions can only
	// GET (criu lazy-pages --page-server).
	Keep bool
	// NoSync skips the fsyncs of the commit at CLOSE, as criu page-server
	// does (it never syncs): the images are complete when CLOSE is
	// answered but a crash of the host may lose them.
	NoSync bool
	// Server carries the timeouts; Run sets its Store, ImagesDir, TLS,
	// OnSession and Logger.
	Server Config
	// Logger receives the server's and the store's lines; nil: discard.
	Logger *slog.Logger
}

// DefaultRunConfig returns a RunConfig with the default timeouts.
func DefaultRunConfig() RunConfig {
	return RunConfig{Server: DefaultConfig()}
}

// Validate reports every problem of c that can be seen without touching
// the system.
func (c RunConfig) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("no listen address"))
	} else if c.TLSDir == "" {
		if err := checkLoopback(c.Listen); err != nil {
			errs = append(errs, err)
		}
	}
	switch {
	case c.TLSDir != "" && c.Peers == nil:
		errs = append(errs, errors.New("with TLS, name the clients the page server admits (--allow-peer NAME) or say --allow-any-peer"))
	case c.TLSDir != "":
		if err := c.Peers.Validate(); err != nil {
			errs = append(errs, err)
		}
	case c.Peers != nil:
		errs = append(errs, errors.New("--allow-peer needs --tls-dir: without TLS only this user's local connections are admitted"))
	}
	if c.ImagesDir == "" {
		errs = append(errs, errors.New("no images dir"))
	}
	return errors.Join(errs...)
}

// Standalone is a listening page server with its store.
type Standalone struct {
	cfg   RunConfig
	ln    net.Listener
	store *pagestore.Store
	srv   *Server
	done  func() // ends Serve after a session; set by Serve before it accepts
}

// Run listens as cfg says and serves until the first session ends with
// CLOSE (or, with cfg.Keep, until ctx ends).
func Run(ctx context.Context, cfg RunConfig) error {
	p, err := Listen(cfg)
	if err != nil {
		return err
	}
	return p.Serve(ctx)
}

// Listen validates cfg, loads the TLS identity, opens the store and
// listens. The caller must call Serve or Close.
func Listen(cfg RunConfig) (_ *Standalone, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := checkImagesDir(cfg.ImagesDir); err != nil {
		return nil, err
	}
	var tlsConf *tls.Config
	if cfg.TLSDir != "" {
		if tlsConf, err = serverTLS(cfg.TLSDir, cfg.Peers); err != nil {
			return nil, fmt.Errorf("tls-dir: %w", err)
		}
	}
	scfg := pagestore.DefaultConfig(cfg.ImagesDir)
	scfg.NoSync = cfg.NoSync
	scfg.Logger = log
	store, err := pagestore.New(scfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			store.Close()
		}
	}()
	p := &Standalone{cfg: cfg, store: store}
	srvCfg := cfg.Server
	srvCfg.Store, srvCfg.ImagesDir, srvCfg.TLS, srvCfg.Logger = store, cfg.ImagesDir, tlsConf, log
	srvCfg.OnSession = p.sessionEnded
	if p.srv, err = NewServer(srvCfg); err != nil {
		return nil, err
	}
	if p.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, err
	}
	if addr, ok := p.ln.Addr().(*net.TCPAddr); tlsConf == nil && (!ok || !addr.IP.IsLoopback()) {
		p.ln.Close()
		return nil, fmt.Errorf("listen %s: %w: it listens on %v", cfg.Listen, ErrInsecureListen, p.ln.Addr())
	}
	if tlsConf == nil {
		// Without TLS only this user's processes may connect: any local
		// user could otherwise read the pages back (--keep) or take the
		// only session.
		p.ln = sameUserListener{Listener: p.ln, log: log}
	}
	log.Info("page server listening", "addr", p.ln.Addr().String(), "images", cfg.ImagesDir, "tls", tlsConf != nil)
	return p, nil
}

// Addr returns the address p listens on.
func (p *Standalone) Addr() net.Addr { return p.ln.Addr() }

// Serve serves sessions until the first one ends with CLOSE (cfg.Keep:
// until ctx ends), then closes the listener and the store. Without Keep it
// returns an error if ctx ends first.
func (p *Standalone) Serve(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	p.done = func() { cancel(errSessionDone) }
	err := errors.Join(p.srv.Serve(ctx, p.ln), p.store.Close())
	if cause := context.Cause(ctx); err == nil && !p.cfg.Keep && !errors.Is(cause, errSessionDone) {
		err = fmt.Errorf("page server stopped before a session ended with CLOSE: %w", cause)
	}
	return err
}

// Close closes the listener and the store of a Standalone that is not
// serving.
func (p *Standalone) Close() error {
	return errors.Join(p.ln.Close(), p.store.Close())
}

var errSessionDone = errors.New("session done")

func (p *Standalone) sessionEnded(_ Stats, err error) {
	if err == nil && !p.cfg.Keep {
		p.done()
	}
}

// checkLoopback refuses a listen address that is not loopback.
func checkLoopback(listen string) error {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", listen, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("listen %s: %w: give a tls-dir or a loopback address (127.0.0.1, [::1], localhost)", listen, ErrInsecureListen)
}

// checkImagesDir refuses a dir holding page images (Commit never
// overwrites them) or an interrupted commit's files.
func checkImagesDir(dir string) error {
	partial, err := pagestore.Partial(dir)
	if err != nil {
		return fmt.Errorf("images dir %s: %w", dir, err)
	}
	if len(partial) > 0 {
		return fmt.Errorf("images dir %s: an interrupted commit left %v in %s.partial: remove them", dir, partial, dir)
	}
	for _, pat := range []string{"pagemap-*.img", "pages-*.img"} {
		m, err := filepath.Glob(filepath.Join(dir, pat))
		if err != nil {
			return fmt.Errorf("images dir %s: %w", dir, err)
		}
		if len(m) > 0 {
			return fmt.Errorf("images dir %s already holds page images (%s): use one without", dir, filepath.Base(m[0]))
		}
	}
	return nil
}

// serverTLS loads dir's identity for TLS 1.3 with client certificates
// chaining to dir's ca.crt that peers admits.
func serverTLS(dir string, peers *transport.PeerPolicy) (*tls.Config, error) {
	id, err := transport.LoadTLS(dir)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no client certificate")
			}
			return peers.Authorize(cs.PeerCertificates[0])
		},
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    id.Roots,
		// CRIU's GnuTLS client fails its first read (EAGAIN) when a
		// NewSessionTicket arrives before the reply: spec.md §7.
		SessionTicketsDisabled: true,
	}, nil
}

// sameUserListener accepts loopback connections whose other end belongs
// to this process's user only (linux.LoopbackPeerUID: TCP has no
// SO_PEERCRED); others are closed at once and logged.
type sameUserListener struct {
	net.Listener
	log *slog.Logger
}

func (l sameUserListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, err := peerUID(c)
		if err == nil && uid == os.Geteuid() {
			return c, nil
		}
		l.log.Warn("peer refused", "peer", c.RemoteAddr().String(), "reason", "another local user", "uid", uid, "err", err)
		c.Close()
	}
}

func peerUID(c net.Conn) (int, error) {
	local, err := linux.AddrPortOf(c.LocalAddr())
	if err != nil {
		return -1, err
	}
	peer, err := linux.AddrPortOf(c.RemoteAddr())
	if err != nil {
		return -1, err
	}
	return linux.LoopbackPeerUID(local, peer)
}

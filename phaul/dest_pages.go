package phaul

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/phaul/phaul/core/images"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/pageserver"
)

// What the destination receives: the page streams (lanes) into its page
// store, then the other images; and the populate probe and prefault that
// let a pre-copy source predict the restore's cost.

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
				in.fetchStreams = fst
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
	in.store.Store(store) // its spool has no name: checkDisk counts it here
	defer in.store.Store(nil)
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

package phaul

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/phaul/phaul/core/pagestore"
	"github.com/phaul/phaul/core/transport"
	"github.com/phaul/phaul/core/wire"
	"github.com/phaul/phaul/lazy"
	"github.com/phaul/phaul/pageserver"
)

// Post-copy on the destination: the final set marks the pages still at
// the source as lazy entries without content; the lazy restore's daemon
// fetches those from the source on the fetch streams (faults on one, the
// fill on the other) and reads the rest from the images.

// fetchClients are the destination's ends of the fetch streams.
type fetchClients struct {
	faults, fill *pageserver.FetchClient
}

// acceptFetch takes the two fetch streams: first (already accepted) and
// the next one.
func acceptFetch(ctx context.Context, sess *transport.Session, first *transport.Stream) ([2]*transport.Stream, error) {
	var got [2]*transport.Stream
	fail := func(st *transport.Stream, err error) ([2]*transport.Stream, error) {
		if st != nil {
			st.Close()
		}
		for _, g := range got {
			if g != nil {
				g.Close()
			}
		}
		return [2]*transport.Stream{}, fmt.Errorf("fetch stream: %w", err)
	}
	st := first
	for i := range got {
		if i > 0 {
			var err error
			if st, err = sess.AcceptStream(ctx); err != nil {
				return fail(nil, err)
			}
		}
		if st.Kind() != transport.KindFetch {
			return fail(st, fmt.Errorf("got a %s stream", st.Kind()))
		}
		stop := context.AfterFunc(ctx, func() { st.SetDeadline(time.Now()) })
		role, err := pageserver.ReadFetchPreface(st)
		stop()
		if err == nil && got[role] != nil {
			err = fmt.Errorf("%w: two %s streams", pageserver.ErrFetch, role)
		}
		if err != nil {
			return fail(st, err)
		}
		got[role] = st
	}
	return got, nil
}

// closeFetch closes the source's fetch streams (the helper's relays end
// with them).
func (in *incoming) closeFetch() {
	for _, st := range in.fetchStreams {
		if st != nil {
			st.Close()
		}
	}
}

func (f *fetchClients) close() {
	if f != nil {
		f.faults.Close()
		f.fill.Close()
	}
}

// remoteSource is a post-copy restore's lazy.Source: ranges the final set
// left at the source are fetched from there, the rest read from the
// images.
type remoteSource struct {
	local  *lazy.ImageSource
	fetch  *fetchClients
	remote map[uint64][]span // by image id: sorted, disjoint
	pages  atomic.Uint64     // fetched
}

// ReadPages implements lazy.Source. The remote parts of the range are
// asked for all at once (pipelined on one stream) before the local parts
// are read, so a range of scattered remote pages costs one round trip,
// not one each.
func (r *remoteSource) ReadPages(ctx context.Context, id, vaddr uint64, buf []byte) error {
	spans := r.remote[id]
	c := r.fetch.fill
	if lazy.IsFaultRead(ctx) {
		c = r.fetch.faults
	}
	var pending []*pageserver.Pending
	var fetched uint64
	wait := func() error {
		var first error
		for _, p := range pending {
			if err := p.Wait(ctx); err != nil && first == nil {
				first = err
			}
		}
		pending = nil
		return first
	}
	for len(buf) > 0 {
		n, remote := runAt(spans, vaddr, uint64(len(buf)))
		if remote {
			p, err := c.Start(id, vaddr, buf[:n])
			if err != nil {
				return errors.Join(err, wait())
			}
			pending = append(pending, p)
			fetched += n / pagestore.PageSize
		} else if err := r.local.ReadPages(ctx, id, vaddr, buf[:n]); err != nil {
			return errors.Join(err, wait())
		}
		buf, vaddr = buf[n:], vaddr+n
	}
	if err := wait(); err != nil {
		return err
	}
	r.pages.Add(fetched)
	return nil
}

// Remote implements lazy.Remoter.
func (r *remoteSource) Remote(id, vaddr uint64) bool {
	_, remote := runAt(r.remote[id], vaddr, pagestore.PageSize)
	return remote
}

// remoteSpans reads, before lazy.MarkImages changes them, the ranges of
// dir's pagemaps that are lazy without content in any level: what the
// final set left at the source. (A PE_PARENT range has its content in
// parent/; a range the parent level lists but the top level marks lazy
// was written since, and only the source has its content.)
func remoteSpans(dir string) (map[uint64][]span, uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, 0, err
	}
	out := make(map[uint64][]span)
	var pages uint64
	for _, e := range ents {
		k, ok := pagestore.ParsePagemapName(e.Name())
		if !ok || k.Kind != pagestore.KindTask {
			continue
		}
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, 0, err
		}
		m, err := pagestore.ReadPagemap(f)
		f.Close()
		if err != nil {
			return nil, 0, fmt.Errorf("%s: %w", e.Name(), err)
		}
		var spans []span
		for _, pe := range m.Entries {
			if pe.Flags != pagestore.FlagLazy {
				continue
			}
			// In address order and bounded: ReadPagemap checks both.
			spans = appendSpan(spans, pe.Vaddr, pe.Vaddr+pe.NrPages*pagestore.PageSize)
			pages += pe.NrPages
		}
		if len(spans) > 0 {
			out[k.ID] = spans
		}
	}
	return out, pages, nil
}

// postcopyDoneMsg tells the source that every page is in place, with the
// daemon's account.
func postcopyDoneMsg(st lazy.Stats, remotePages uint64) *wire.Message {
	d := &wire.PostcopyDone{FaultPages: st.FaultPages, PushedPages: st.PushedPages, Faults: st.Faults,
		FaultP50Ns: uint64(st.FaultP50), FaultP99Ns: uint64(st.FaultP99), FaultMaxNs: uint64(st.FaultMax),
		FillNanos: uint64(st.FillTime)}
	d.RemotePages = remotePages
	d.RemoteFaultP50Ns, d.RemoteFaultP99Ns, d.RemoteFaultMaxNs = uint64(st.RemoteFaultP50), uint64(st.RemoteFaultP99), uint64(st.RemoteFaultMax)
	d.LocalFaultP50Ns, d.LocalFaultP99Ns, d.LocalFaultMaxNs = uint64(st.LocalFaultP50), uint64(st.LocalFaultP99), uint64(st.LocalFaultMax)
	d.RemoteFaults, d.LocalFaults = st.RemoteFaults, st.LocalFaults
	return &wire.Message{Body: &wire.Message_PostcopyDone{PostcopyDone: d}}
}

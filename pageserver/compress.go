package pageserver

import (
	"fmt"
	"time"
)

// compressPolicy decides, per forward session, whether batches are
// zstd-compressed. In auto mode it compares two rates measured on this
// session, with the ratio the compressor achieves on this data:
//
//   - the link's: wire bytes per second of time spent in writes, sampled
//     only over windows of raw batches, the first window left out (it
//     fills buffers). A write blocks when the link is the bottleneck, so
//     then this is the link's rate; when it does not block the rate comes
//     out high and raw is the right choice anyway. With several lanes
//     writing at once, each write's time counts 1/lanes. Compressed
//     windows say nothing about how fast raw would go (the link is not
//     saturated), so they are not sampled; while compression stays on, one
//     raw window every refreshBytes refreshes the link's rate.
//   - the compressor's: raw bytes per CPU second of EncodeAll, times the
//     compressors running at once, and its ratio; sampled on every
//     compressed batch, and while off on one batch in probeEvery.
//
// Lanes compress while other lanes write, so compressed, raw bytes move at
// min(compressor, link/ratio), against the link's rate raw.
type compressPolicy struct {
	mode string // "auto", "on", "off"
	on   bool

	frames int // batches since the last probe, while off

	// Exponentially weighted rates, bytes per second.
	linkRate float64 // wire bytes the link took, raw windows only
	compRate float64 // raw bytes the compressor took
	ratio    float64 // compressed/raw, < 1 is good

	winBytes uint64        // raw wire bytes written in the current window
	winTime  time.Duration // spent writing them
	warm     bool          // the first window is over

	switches uint64 // times decide changed on

	// parallel: compressors running at once (lanes, as far as there are
	// CPUs); lanes: streams writing at once, sharing the link.
	parallel, lanes float64

	sinceRefresh uint64 // raw bytes sent compressed since the link was sampled
	refreshing   bool   // sending one raw window to sample the link
}

const (
	probeEvery = 32
	ewma       = 0.2
	// linkEWMA weighs a new link sample: each spans a whole rateWindow
	// already, and a stale rate costs wire bytes.
	linkEWMA = 0.5
	// rateWindow is how many bytes one link-rate sample spans: several
	// writes, so buffered writes that did not block and writes that
	// waited for the link average out. The first window of a stream is
	// not sampled: it fills the stream's and the socket's buffers without
	// waiting for the link.
	rateWindow = 4 << 20
	// refreshBytes: while compressing, the link's rate is sampled again
	// after this many raw bytes (about 1.5% of them then go raw).
	refreshBytes = 512 << 20
)

func newCompressPolicy(mode string) (*compressPolicy, error) {
	switch mode {
	case "", "auto":
		// frames starts at the probe point: the first data frame measures
		// the compressor.
		return &compressPolicy{mode: "auto", frames: probeEvery - 1}, nil
	case "on":
		return &compressPolicy{mode: "on", on: true, ratio: 1}, nil
	case "off":
		return &compressPolicy{mode: "off", ratio: 1}, nil
	}
	return nil, fmt.Errorf("compress %q: want auto, on or off", mode)
}

func blend(old, v float64) float64 {
	if old == 0 {
		return v
	}
	return old*(1-ewma) + v*ewma
}

// wrote records that n frame bytes took d to write; compressed says the
// frame was a compressed data frame.
func (p *compressPolicy) wrote(n uint64, d time.Duration, compressed bool) {
	if compressed || (p.on && !p.refreshing) {
		// Raw frames among compressed ones (a batch that did not
		// shrink) share a link that is not saturated: no sample.
		return
	}
	p.winBytes += n
	p.winTime += time.Duration(float64(d) / max(p.lanes, 1))
	if p.winBytes < rateWindow {
		return
	}
	rate := float64(p.winBytes) / max(p.winTime.Seconds(), 1e-7)
	p.winBytes, p.winTime = 0, 0
	if !p.warm {
		p.warm = true
		return
	}
	if p.linkRate == 0 {
		p.linkRate = rate
	} else {
		p.linkRate = p.linkRate*(1-linkEWMA) + rate*linkEWMA
	}
	p.refreshing = false
	if p.mode == "auto" {
		p.decide()
	}
}

// shouldCompress says whether to compress the next data frame of raw
// bytes.
func (p *compressPolicy) shouldCompress(raw int) bool {
	switch p.mode {
	case "on":
		return true
	case "off":
		return false
	}
	if p.on && !p.refreshing {
		p.sinceRefresh += uint64(raw)
		if p.sinceRefresh >= refreshBytes {
			p.sinceRefresh = 0
			p.refreshing = true
			p.winBytes, p.winTime = 0, 0
		}
	}
	if p.on && !p.refreshing {
		return true
	}
	p.frames++
	if p.frames >= probeEvery {
		p.frames = 0
		return true
	}
	return false
}

// compressed records a compression of raw bytes into z bytes taking d.
func (p *compressPolicy) compressed(raw, z int, d time.Duration) {
	p.compRate = blend(p.compRate, max(p.parallel, 1)*float64(raw)/max(d.Seconds(), 1e-7))
	p.ratio = blend(p.ratio, float64(z)/float64(raw))
	if p.mode == "auto" && !p.refreshing {
		p.decide()
	}
}

// decide switches compression on or off from the current estimates.
func (p *compressPolicy) decide() {
	if p.linkRate == 0 || p.compRate == 0 {
		return // not measured yet: stay raw
	}
	// Compression of one batch overlaps the write of the one before, so
	// compressed, raw bytes move at the slower of the two.
	gain := min(p.compRate, p.linkRate/max(p.ratio, 1e-3)) / p.linkRate
	was := p.on
	switch {
	case gain >= 1.1, p.ratio <= 0.5 && gain >= 0.95:
		// Faster, or half the bytes at about the same speed.
		p.on = true
	case gain < 0.75, p.ratio > 0.5 && gain < 0.85, p.ratio > 0.9 && gain < 1.1:
		// Slower: by a quarter even when it halves the bytes (a
		// migration shares its link), by 15 % otherwise.
		p.on = false
	}
	// Between the two: keep the choice (hysteresis).
	if p.on != was {
		p.switches++
	}
}

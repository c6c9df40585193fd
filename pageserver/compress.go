package pageserver

import (
	"fmt"
	"time"
)

// compressPolicy decides, per forward stream, whether data frames are
// zstd-compressed. In auto mode it compares two rates measured on this
// stream: how fast the link drains bytes (write time of frames) and how
// fast the compressor eats this data, with the ratio it achieves. Sending
// compressed moves raw bytes at min(compressor, link/ratio); raw moves them
// at the link's rate. It probes the compressor on one frame in probeEvery
// while off, so a change in the data or the link turns it back on.
type compressPolicy struct {
	mode string // "auto", "on", "off"
	on   bool

	frames int // data frames since the last probe

	// Exponentially weighted rates, bytes per second.
	linkRate float64 // wire bytes the link took
	compRate float64 // raw bytes the compressor took
	ratio    float64 // compressed/raw, < 1 is good
	probing  bool

	winBytes uint64        // written in the current window
	winTime  time.Duration // spent writing them
}

const (
	probeEvery = 32
	ewma       = 0.2
)

func newCompressPolicy(mode string) (*compressPolicy, error) {
	switch mode {
	case "", "auto":
		// frames starts at the probe point: the first data frame measures.
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

// rateWindow is how many bytes one link-rate sample spans: several buffer
// flushes, so buffered writes that did not block and writes that waited
// for the link average out.
const rateWindow = 8 << 20

// wrote records that n frame bytes took d to write.
func (p *compressPolicy) wrote(n uint64, d time.Duration) {
	p.winBytes += n
	p.winTime += d
	if p.winBytes < rateWindow {
		return
	}
	p.linkRate = blend(p.linkRate, float64(p.winBytes)/max(p.winTime.Seconds(), 1e-7))
	p.winBytes, p.winTime = 0, 0
}

// shouldCompress says whether to compress the next data frame.
func (p *compressPolicy) shouldCompress() bool {
	switch p.mode {
	case "on":
		return true
	case "off":
		return false
	}
	if p.on {
		return true
	}
	p.frames++
	if p.frames >= probeEvery {
		p.frames = 0
		p.probing = true
		return true
	}
	return false
}

// compressed records a compression of raw bytes into z bytes taking d.
func (p *compressPolicy) compressed(raw, z int, d time.Duration) {
	p.compRate = blend(p.compRate, float64(raw)/max(d.Seconds(), 1e-7))
	p.ratio = blend(p.ratio, float64(z)/float64(raw))
	p.probing = false
	if p.mode != "auto" || p.linkRate == 0 {
		return
	}
	// Raw bytes per second either way; compression runs inline, before
	// the write, so its time adds to the link's.
	viaZstd := 1 / (1/p.compRate + max(p.ratio, 1e-3)/p.linkRate)
	switch {
	case p.ratio <= 0.5 && p.compRate >= p.linkRate:
		// Halving the bytes at no loss of speed: worth it on any link.
		p.on = true
	case viaZstd > 1.1*p.linkRate:
		p.on = true
	case viaZstd < 0.9*p.linkRate:
		p.on = false // hysteresis: between the two, keep the choice
	}
}

package phaul

import (
	"context"
	"fmt"
	"time"

	"github.com/phaul/phaul/core/cgroup"
	"github.com/phaul/phaul/core/pagestore"
)

// Convergence: the rounds go on while the dirty set shrinks and what is
// left would not cross within the downtime target; auto-converge throttles
// a tree that dirties memory faster than the link carries it; the
// destination's floor (what a freeze costs there whatever the memory) and
// prefault come from it.

// rounds runs pre-copy until what is left fits the downtime target or it
// stops converging, and returns why it stopped. What the last collect
// found stays pending for the final phase.
func (p *precopy) rounds(ctx context.Context) (string, error) {
	cfg := p.s.cfg
	var (
		best   = ^uint64(0)
		last   = ^uint64(0) // the dirty set of the round before
		noGain int
	)
	for round := p.round + 1; ; round++ {
		t0 := time.Now()
		if err := p.refresh(); err != nil {
			return "", err
		}
		var dirtyRate float64 // bytes per second since the last collect
		if round > 1 {
			if err := p.collect(); err != nil {
				return "", err
			}
			if round == faultDropCollect() {
				p.s.log.Warn("fault injection: dropping what this round collected", "round", round)
				for _, pr := range p.procs {
					pr.pending = nil
				}
			}
		}
		dirtyBytes := p.pendingBytes()
		if round > 1 {
			dirtyRate = float64(dirtyBytes) / max(time.Since(p.lastCollect).Seconds(), 1e-3)
		}
		p.lastCollect = time.Now()
		if round == 1 {
			var err error
			if p.floorD, err = p.floor(ctx, dirtyBytes); err != nil {
				return "", err
			}
		}
		floor := p.floorD
		if round > 1 {
			// Expected downtime if frozen now: the floor plus the dirty
			// set at the last round's bandwidth.
			expected := floor + time.Duration(float64(dirtyBytes)/max(p.bandwidth, 1)*float64(time.Second))
			reason := ""
			switch {
			case expected <= cfg.DowntimeTarget:
				reason = fmt.Sprintf("expected downtime %v fits the target %v", expected.Round(time.Millisecond), cfg.DowntimeTarget)
			case cfg.Mode == ModeHybrid && round > cfg.HybridRounds:
				reason = fmt.Sprintf("hybrid: %d rounds done; %d KiB left for post-copy", cfg.HybridRounds, dirtyBytes>>10)
			case cfg.Mode == ModeHybrid && dirtyBytes >= last:
				reason = fmt.Sprintf("hybrid: the dirty set stopped shrinking (%d KiB after %d KiB); the rest moves after the resume", dirtyBytes>>10, last>>10)
			case round > cfg.MaxRounds:
				reason = fmt.Sprintf("max rounds (%d) reached; expected downtime %v", cfg.MaxRounds, expected.Round(time.Millisecond))
			case floor > cfg.DowntimeTarget && dirtyBytes >= last:
				reason = fmt.Sprintf("the floor %v alone exceeds the target %v and the dirty set stopped shrinking (%d KiB); expected downtime %v",
					floor.Round(time.Millisecond), cfg.DowntimeTarget, dirtyBytes>>10, expected.Round(time.Millisecond))
			}
			if dirtyBytes < best {
				best, noGain = dirtyBytes, 0
			} else if noGain++; noGain >= 3 && reason == "" {
				reason = fmt.Sprintf("no gain in 3 rounds (dirty set %d KiB); expected downtime %v", dirtyBytes>>10, expected.Round(time.Millisecond))
			}
			p.s.log.Info("pre-copy", "round", round, "dirty_kib", dirtyBytes>>10, "dirty_rate_mbps", dirtyRate/1e6,
				"expected_downtime", expected.Round(time.Millisecond))
			p.expected = expected
			if reason != "" {
				if pct := p.throttlePct(); pct > 0 {
					reason += fmt.Sprintf("; auto-converge throttled the tree by %d%%", pct)
				}
				return reason, nil
			}
		}
		last = dirtyBytes
		if cfg.AutoConverge {
			if err := p.autoConverge(round, dirtyRate, p.bandwidth); err != nil {
				return "", err
			}
		}
		p.roundPages, p.roundBytes = 0, 0
		p.round, p.remaining = round, dirtyBytes
		wire0 := p.fw.Stats().WireBytes
		if err := p.sendPending(ctx); err != nil {
			return "", err
		}
		d := time.Since(t0)
		p.bandwidth = float64(p.roundBytes) / max(d.Seconds(), 1e-3)
		if err := p.s.keepalive(ctx); err != nil {
			return "", err
		}
		p.s.stats.Rounds = append(p.s.stats.Rounds, Round{Round: round, Kind: "precopy",
			DirtyPages: dirtyBytes / pagestore.PageSize, PagesSent: p.roundPages,
			BytesWire: p.fw.Stats().WireBytes - wire0, DurationMS: ms(d),
			BandwidthMBps: p.bandwidth / 1e6, DirtyRateMBps: dirtyRate / 1e6, ThrottlePct: p.throttlePct()})
	}
}

func (p *precopy) throttlePct() int {
	if p.throttle == nil {
		return 0
	}
	return p.throttle.Percent()
}

// autoConverge runs before each round's send, as QEMU's does after each
// pass: a round that found more dirtied than half of what the round before
// sent counts as too fast, and two in a row raise the throttle, 20% of the
// tree's unthrottled CPU first, then 10% more, up to 99%.
func (p *precopy) autoConverge(round int, dirtyRate, bandwidth float64) error {
	pids := p.pids()
	if p.throttle == nil {
		// The tree's CPU use so far, unthrottled.
		now, cpu := time.Now(), cgroup.TreeCPU(pids)
		if !p.cpuAt.IsZero() {
			p.cores = max(float64(cpu-p.cpuBefore)/float64(now.Sub(p.cpuAt)), 0.01)
		}
		p.cpuAt, p.cpuBefore = now, cpu
	}
	if round < 2 {
		return nil
	}
	if dirtyRate <= bandwidth/2 {
		p.tooFast = 0
		return nil
	}
	if p.tooFast++; p.tooFast < 2 {
		return nil
	}
	p.tooFast = 0
	pct := 20
	if p.throttle != nil {
		pct = min(p.throttle.Percent()+10, 99)
		if pct == p.throttle.Percent() {
			return nil
		}
	} else {
		t, err := cgroup.NewThrottle(p.s.stats.MigrationID+"-throttle", pids)
		if err != nil {
			return fmt.Errorf("auto-converge: %w", err)
		}
		// Recorded before the tree moves: a phaul killed meanwhile
		// leaves it throttled, and gc moves it back.
		err = p.s.j.record(func(e *JournalEntry) {
			e.Cgroups = append(e.Cgroups, "cpu:"+t.Group())
			e.ThrottleBack = t.Origin()
		})
		if err != nil {
			return fmt.Errorf("auto-converge: %w", err)
		}
		p.throttle = t
	}
	if err := p.throttle.Set(pids, pct, p.cores); err != nil {
		return fmt.Errorf("auto-converge: %w", err)
	}
	p.s.stats.AutoConvergePct = pct
	p.s.log.Info("auto-converge: throttling the tree", "percent", pct, "cores_unthrottled", p.cores,
		"dirty_rate_mbps", dirtyRate/1e6, "bandwidth_mbps", bandwidth/1e6)
	return nil
}

// releaseThrottle gives the tree its CPU and cgroups back: before the
// freeze, so that CRIU dumps the tree in the cgroups it came from, and
// whatever the outcome. A no-op without a throttle.
func (p *precopy) releaseThrottle() error {
	if p.throttle == nil {
		return nil
	}
	if err := p.throttle.Release(); err != nil {
		return err
	}
	p.throttle = nil
	p.s.log.Info("auto-converge: throttle released, the tree is back in its cpu cgroups")
	return nil
}

// prefault has the destination fill and hold as much memory as the tree
// holds, freed just before the freeze so that the restore reuses memory
// instead of touching it first. The tree runs on meanwhile: rounds follow.
func (p *precopy) prefault(ctx context.Context) error {
	t0 := time.Now()
	if err := p.s.prefault(ctx, p.treeBytes); err != nil {
		return fmt.Errorf("prefault: %w", err)
	}
	p.s.stats.PrefaultMS = ms(time.Since(t0))
	p.s.log.Info("destination prefaulted the tree's memory", "mib", p.treeBytes>>20, "dur", time.Since(t0))
	return nil
}

// floor predicts the downtime no pre-copy round can shorten: the fixed
// part of CRIU's dump and restore (--downtime-floor) plus filling the
// tree's memory on the destination, at the cost per MiB it measures now.
// It says so when that alone exceeds the target.
func (p *precopy) floor(ctx context.Context, treeBytes uint64) (time.Duration, error) {
	cfg := p.s.cfg
	perMiB, err := p.s.probePopulate(ctx)
	if err != nil {
		return 0, fmt.Errorf("populate probe: %w", err)
	}
	p.treeBytes = treeBytes
	p.destLazy = perMiB <= 1 // a lazy restore writes no memory in the freeze
	floor := cfg.DowntimeFloor + time.Duration(float64(perMiB)*float64(treeBytes)/(1<<20))
	p.s.stats.FloorMS = ms(floor)
	p.s.stats.PopulateMSPerGiB = ms(perMiB * 1024)
	p.s.log.Info("downtime floor", "floor", floor.Round(time.Millisecond), "fixed", cfg.DowntimeFloor,
		"tree_mib", treeBytes>>20, "populate_per_mib", perMiB)
	if floor > cfg.DowntimeTarget {
		p.s.log.Warn("the downtime floor alone exceeds the target: freezing once the dirty set stops shrinking",
			"floor", floor.Round(time.Millisecond), "target", cfg.DowntimeTarget)
	}
	return floor, nil
}

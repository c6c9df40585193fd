package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// UnixSink is the peer of WorkloadOpts.ExtUnix: a workload process in sink
// mode, outside the workload's tree, that binds a SOCK_DGRAM socket at Path
// and logs each "tick seq=N" it receives. N counts every tick the workload
// tried; ticks it could not queue are dropped, so N grows with gaps but never
// goes back.
type UnixSink struct {
	Path string // the bound socket
	Log  string // "sink ready path=P", then "sink tick seq=N" per tick
	cmd  *exec.Cmd
}

// StartUnixSink starts a sink inside ns (nil: the test's netns) and stops it
// at cleanup. Put it in the netns where CRIU dumps the workload: CRIU finds
// the external peer through sock_diag, which shows only its own netns. After
// a restore elsewhere, the workload reconnects by path. Start it before
// StartWorkload, so the workload is killed first (cleanups run last-in
// first-out).
func StartUnixSink(tb testing.TB, ns *Netns) *UnixSink {
	tb.Helper()
	bin := BuildWorkload(tb)
	dir, err := os.MkdirTemp("", "phaul-sink-") // sun_path holds 107 bytes
	if err != nil {
		tb.Fatalf("sink dir: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	s := &UnixSink{Path: filepath.Join(dir, "sock"), Log: filepath.Join(dir, "sink.log")}
	args := []string{"--sink", s.Path, "--log", s.Log}
	if ns != nil {
		RequireCommand(tb, "nsenter")
		s.cmd = ns.Command(context.Background(), bin, args...) // lives until Stop
	} else {
		s.cmd = exec.Command(bin, args...)
	}
	out, err := os.Create(filepath.Join(dir, "sink.out"))
	if err != nil {
		tb.Fatalf("sink output: %v", err)
	}
	s.cmd.Stdout, s.cmd.Stderr = out, out
	err = s.cmd.Start()
	out.Close() // the child has its own copy
	if err != nil {
		tb.Fatalf("start sink: %v", err)
	}
	tb.Cleanup(func() { s.Stop() })
	ok, err := poll(10*time.Second, func() (bool, error) {
		data, err := os.ReadFile(s.Log)
		return strings.HasPrefix(string(data), "sink ready"), ignoreNotExist(err)
	})
	if err != nil || !ok {
		tb.Fatalf("sink not ready: %v", err)
	}
	return s
}

// Ticks returns the sequence numbers received so far, in order.
func (s *UnixSink) Ticks() ([]uint64, error) {
	data, err := os.ReadFile(s.Log)
	if err != nil {
		return nil, err
	}
	st, err := parseLog(data)
	if err != nil {
		return nil, err
	}
	var seqs []uint64
	for _, l := range st.lines {
		num, ok := strings.CutPrefix(l, "sink tick seq=")
		if !ok {
			continue
		}
		seq, err := strconv.ParseUint(num, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: %q", errMalformed, l)
		}
		seqs = append(seqs, seq)
	}
	return seqs, nil
}

// WaitTicks waits until n more ticks than now arrived and fails the test if a
// tick's number is below the one before.
func (s *UnixSink) WaitTicks(tb testing.TB, n int) {
	tb.Helper()
	ticks, err := s.Ticks()
	if err != nil {
		tb.Fatalf("sink: %v", err)
	}
	from := len(ticks)
	timeout := 30*time.Second + 4*time.Duration(n)*stepPeriod
	ok, err := poll(timeout, func() (bool, error) {
		ticks, err = s.Ticks()
		for i := 1; i < len(ticks) && err == nil; i++ {
			if ticks[i] < ticks[i-1] {
				err = fmt.Errorf("%w: tick %d after %d", ErrUnhealthy, ticks[i], ticks[i-1])
			}
		}
		return len(ticks) >= from+n, err
	})
	if err != nil {
		tb.Fatalf("sink %s: %v", s.Log, err)
	}
	if !ok {
		tb.Fatalf("sink %s: %d ticks after %d wanted, have %d after %v", s.Log, n, from, len(ticks), timeout)
	}
}

// Stop kills the sink and waits for it; the workload's next tick then fails
// (FAIL ext-unix). Cleanup stops it too.
func (s *UnixSink) Stop() {
	s.cmd.Process.Kill() // fails only if it is gone already
	s.cmd.Wait()         // a kill's exit status, or an error on the second call
}

func ignoreNotExist(err error) error {
	if os.IsNotExist(err) {
		return nil
	}
	return err
}

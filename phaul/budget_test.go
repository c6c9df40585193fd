package phaul

import (
	"strings"
	"testing"
)

// TestMemBudget: grants are whole MiB, never more than the limit in all,
// and what is given back may be granted again.
func TestMemBudget(t *testing.T) {
	b := &memBudget{limit: 10 << 20}
	if got := b.take(6<<20 + 123); got != 6<<20 {
		t.Fatalf("take 6 MiB+: %d, want 6 MiB", got)
	}
	if got := b.take(6 << 20); got != 4<<20 {
		t.Fatalf("take 6 MiB with 4 MiB left: %d", got)
	}
	if got := b.take(1 << 20); got != 0 {
		t.Fatalf("take with nothing left: %d", got)
	}
	b.give(6 << 20)
	if got := b.take(8 << 20); got != 6<<20 {
		t.Fatalf("take after 6 MiB came back: %d, want 6 MiB", got)
	}
	// Without a limit: half of what is available, counting what is held
	// (here nothing is really allocated, so what is available stays: the
	// second grant is the room left under half of available+held).
	u := &memBudget{}
	first := u.take(1 << 62)
	second := u.take(1 << 62)
	if first == 0 || second > first/2+1<<20 {
		t.Fatalf("unlimited budget: granted %d then %d; want the second at most half the first", first, second)
	}
	u.give(first + second)
	if u.held != 0 {
		t.Fatalf("held %d after everything came back", u.held)
	}
}

// TestSessionBounds: sessions are refused past either bound, and a closed
// one makes room again.
func TestSessionBounds(t *testing.T) {
	s := &Server{cfg: ServeConfig{MaxSessionsPerPeer: 2, MaxSessions: 3}, sessions: map[string]int{}}
	for i := range 2 {
		if err := s.openSession(nil); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
	}
	if err := s.openSession(nil); err == nil || !strings.Contains(err.Error(), "max-sessions-per-peer") {
		t.Fatalf("a third session of one source: %v, want refused (--max-sessions-per-peer)", err)
	}
	s.cfg.MaxSessionsPerPeer = 10
	if err := s.openSession(nil); err != nil {
		t.Fatal(err)
	}
	if err := s.openSession(nil); err == nil || !strings.Contains(err.Error(), "--max-sessions)") {
		t.Fatalf("a fourth session in all: %v, want refused (--max-sessions)", err)
	}
	s.closeSession(nil)
	if err := s.openSession(nil); err != nil {
		t.Fatalf("after one closed: %v", err)
	}
}

package phaul

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/phaul/phaul/pageserver"
)

// Result of a migration.
const (
	ResultOK      = "ok"       // the tree runs on the destination only
	ResultFailed  = "failed"   // the tree still runs on the source only
	ResultInDoubt = "in-doubt" // the source tree is gone; the destination holds it stopped or unknown
)

// Stats describe one migration, from the source's point of view. Every
// duration is measured on the source's monotonic clock; no value mixes the
// two hosts' clocks. The JSON form is the --stats-json schema (README).
type Stats struct {
	MigrationID   string      `json:"migration_id"`
	Mode          Mode        `json:"mode"`
	Result        string      `json:"result"`
	Error         string      `json:"error,omitempty"`
	Destination   string      `json:"destination"`
	SourcePID     int         `json:"source_pid"`
	DestPID       int         `json:"dest_pid,omitempty"`
	Phases        []PhaseMark `json:"phases"`
	DowntimeMS    float64     `json:"downtime_ms"`
	TotalMS       float64     `json:"total_ms"`
	CRIUDumpMS    float64     `json:"criu_dump_ms"`
	CRIURestoreMS float64     `json:"criu_restore_ms"`
	RTTMS         float64     `json:"rtt_ms"`
	// HoldMS is how long moving the lazily dumped tree into its frozen
	// hold cgroup took (inside the freeze); 0 when it was not held so
	// (a full dump, no freezer).
	HoldMS      float64 `json:"hold_ms,omitempty"`
	BytesWire   uint64  `json:"bytes_wire"`
	BytesImages uint64  `json:"bytes_images"`
	Rounds      []Round `json:"rounds"`
	// Pre-copy: why the rounds stopped, and the tracker that ran.
	StopReason string `json:"stop_reason,omitempty"`
	Tracker    string `json:"tracker,omitempty"`
	// Pre-copy: the final dump that ran ("lazy" or "full") and, when it is
	// not the one asked for, why.
	FinalDump    string `json:"final_dump,omitempty"`
	FinalDumpWhy string `json:"final_dump_why,omitempty"`
	// Pre-copy's downtime model, set before round 1: the floor it
	// predicts (the fixed part, --downtime-floor, plus the tree's memory
	// at the populate cost the destination measured per MiB).
	FloorMS          float64 `json:"floor_ms,omitempty"`
	PopulateMSPerGiB float64 `json:"populate_ms_per_gib,omitempty"`
	// Pre-copy's downtime, measured: the last dirty set read from the
	// frozen tree and sent (DowntimeDirtyMS), and the rest: CRIU's dump
	// and restore, the images, the commit (DowntimeCRIUMS). Releasing the
	// dirty tracking inside the freeze costs TrackerReleaseMS of it.
	DowntimeDirtyMS  float64 `json:"downtime_dirty_ms,omitempty"`
	DowntimeCRIUMS   float64 `json:"downtime_criu_ms,omitempty"`
	TrackerReleaseMS float64 `json:"tracker_release_ms,omitempty"`
	// PrefaultMS: how long the destination took to fill and free the
	// tree's memory before the freeze (--prefault).
	PrefaultMS float64 `json:"prefault_ms,omitempty"`
	// AutoConvergePct: the highest throttle --auto-converge applied.
	AutoConvergePct int `json:"auto_converge_pct,omitempty"`
	// Post-copy and hybrid: what moved after the resume.
	Postcopy *PostcopyStats `json:"postcopy,omitempty"`

	start time.Time // monotonic reference
}

// PostcopyStats describe post-copy, from the destination's resume
// (COMMITTED) to every page there (PostcopyDone).
type PostcopyStats struct {
	// MS: resume to the last page in place (as the source sees it:
	// COMMITTED to PostcopyDone).
	MS float64 `json:"ms"`
	// RemotePages: the pages the final set left at the source; the source
	// served ServedFaultPages on the fault stream and ServedFillPages on
	// the fill stream (RefusedRequests it could not), BytesWire in all.
	RemotePages      uint64 `json:"remote_pages"`
	ServedFaultPages uint64 `json:"served_fault_pages"`
	ServedFillPages  uint64 `json:"served_fill_pages"`
	RefusedRequests  uint64 `json:"refused_requests,omitempty"`
	BytesWire        uint64 `json:"bytes_wire"`
	// The destination's lazy-pages daemon: pages copied because a thread
	// faulted and in the background, faults, and fault latency (the
	// fault read to the copy that woke the thread): over every fault, over
	// faults on pages fetched from the source, and over those on pages
	// the destination had.
	FaultPages       uint64  `json:"fault_pages"`
	PushedPages      uint64  `json:"pushed_pages"`
	Faults           uint64  `json:"faults"`
	FaultP50MS       float64 `json:"fault_p50_ms"`
	FaultP99MS       float64 `json:"fault_p99_ms"`
	FaultMaxMS       float64 `json:"fault_max_ms"`
	RemoteFaults     uint64  `json:"remote_faults"`
	RemoteFaultP50MS float64 `json:"remote_fault_p50_ms"`
	RemoteFaultP99MS float64 `json:"remote_fault_p99_ms"`
	RemoteFaultMaxMS float64 `json:"remote_fault_max_ms"`
	LocalFaults      uint64  `json:"local_faults"`
	LocalFaultP50MS  float64 `json:"local_fault_p50_ms"`
	LocalFaultP99MS  float64 `json:"local_fault_p99_ms"`
	LocalFaultMaxMS  float64 `json:"local_fault_max_ms"`
	// DestFillMS: the destination's own measure, its daemon's finish
	// marker to the last page.
	DestFillMS float64 `json:"dest_fill_ms"`
	// Recoveries counts reconnects after a lost connection.
	Recoveries int `json:"recoveries,omitempty"`
}

// PhaseMark records when a phase began.
type PhaseMark struct {
	Phase Phase     `json:"phase"`
	At    time.Time `json:"at"`   // source wall clock, for humans
	TMS   float64   `json:"t_ms"` // since the migration began, monotonic
}

// Round is one memory transfer round: pre-copy rounds ("precopy"), the
// dirty pages read from the frozen tree ("frozen"), and the dump ("final",
// the only one of a cold migration).
type Round struct {
	Round       int     `json:"round"`
	Kind        string  `json:"kind"` // "precopy", "frozen" or "final"
	BytesImages uint64  `json:"bytes_images,omitempty"`
	Files       int     `json:"files,omitempty"`
	DurationMS  float64 `json:"duration_ms"` // final: dump start to images received
	// Pre-copy and frozen rounds: pages found written since the round
	// before (round 1: all), pages read and sent, their bytes on the wire,
	// and the rate they moved at.
	DirtyPages    uint64  `json:"dirty_pages,omitempty"`
	PagesSent     uint64  `json:"pages_sent,omitempty"`
	BytesWire     uint64  `json:"bytes_wire,omitempty"`
	BandwidthMBps float64 `json:"bandwidth_mbps,omitempty"`
	// DirtyRateMBps: DirtyPages' bytes over the time since the collect
	// before (pre-copy rounds after the first).
	DirtyRateMBps float64 `json:"dirty_rate_mbps,omitempty"`
	// ThrottlePct: the auto-converge throttle the round ran under.
	ThrottlePct int `json:"throttle_pct,omitempty"`
	// Pages describes the page stream: pages, zero and duplicate pages
	// (sent without their bytes), bytes before and after compression.
	Pages *pageserver.ForwardStats `json:"pages,omitempty"`
}

func newStats(id string, mode Mode, to string, pid int) *Stats {
	return &Stats{MigrationID: id, Mode: mode, Destination: to, SourcePID: pid, Result: ResultFailed,
		start: time.Now(), Phases: []PhaseMark{}, Rounds: []Round{}}
}

func (s *Stats) mark(p Phase) time.Time {
	now := time.Now()
	s.Phases = append(s.Phases, PhaseMark{Phase: p, At: now, TMS: ms(now.Sub(s.start))})
	return now
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// WriteJSON writes s as one JSON object and a newline.
func (s *Stats) WriteJSON(w io.Writer) error {
	b, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("encode stats: %w", err)
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// AppendJSONFile appends s to the file at path (one object per line).
func (s *Stats) AppendJSONFile(path string) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("stats file: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	return s.WriteJSON(f)
}

// Event is a progress report.
type Event struct {
	Phase   Phase
	Bytes   uint64        // image bytes sent so far in this phase
	Elapsed time.Duration // since the migration began
	// Pre-copy: the round, the dirty bytes it is sending, and the downtime
	// expected if the tree were frozen now.
	Round            int
	Remaining        uint64
	ExpectedDowntime time.Duration
}

// Progress receives events; it is called from the migration's goroutine
// and must not block for long.
type Progress func(Event)

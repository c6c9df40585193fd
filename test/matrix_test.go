package test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/phaul/phaul/core/dirty"
	"github.com/phaul/phaul/core/linux"
	"github.com/phaul/phaul/phaul"
	"github.com/phaul/phaul/test/testenv"
)

// The fault matrix, as QEMU's migration tests cancel after every state:
// each cell kills one agent (SIGKILL, from the test build's fault hook
// PHAUL_FAULT_AT), or the CRIU it runs, as it enters one state of phaul/machine.go, then
// recovers as an operator would (a killed service restarts; an in-doubt
// migration is resolved with `phaul gc --resolved` on both hosts, the
// answer the other end's log gives; `phaul gc` on both hosts) and checks:
// exactly one copy of the workload runs, the expected one, its memory
// intact (it verifies itself), its step counter past where it stood
// before the fault; `phaul gc --show` finds nothing on either host; and a
// survivor on the source migrates again.

// matrixCell is one agent killed at one state.
type matrixCell struct {
	mode string // the migration mode whose run enters the state
	// survivor is the copy that runs after the recovery: "source" or
	// "destination".
	survivor string
	// resolve is the operator's answer for a migration left in doubt
	// (`phaul gc --resolved ID=resolve` on both hosts); "" if none is.
	resolve string
	// recover: the source's migration is taken over (phaul recover on
	// the source host) after its migrate was killed.
	recover bool
	// restart: the killed service is started again at once, as its
	// unit manager would, while the migrate still runs (else after it
	// ended).
	restart bool
	// skip, if set, says why the cell does not run: a state the role
	// never enters, or a loss the design states.
	skip string
}

// A fault is an agent's (ROLE) and what happens to it as it enters a
// state: "kill" (the agent is killed) or "criu" (the CRIU it runs is
// killed).
type fault struct{ role, action string }

func (f fault) String() string {
	return f.role + " " + map[string]string{"kill": "killed", "criu": "CRIU killed", "cut": "link cut", "stall": "stalled 2s"}[f.action]
}

var faults = []fault{{"source", "kill"}, {"destination", "kill"}, {"source", "criu"}, {"destination", "criu"},
	{"source", "cut"}, {"destination", "cut"}, {"source", "stall"}, {"destination", "stall"}}

// stallFor is how long a stalled agent stays stopped: well within every
// timeout, so the migration must go on as if nothing happened.
const stallFor = 2 * time.Second

var (
	initial = matrixCell{skip: "the initial state: no transition enters it (a fault before connect is covered by connect)"}
	after   = matrixCell{skip: "entered only after another failure"}
	noCRIU  = matrixCell{skip: "no CRIU runs in this state"}
)

// faultMatrix has a cell for every state and fault. TestFaultMatrix fails
// when a state has none.
var faultMatrix = map[fault]map[phaul.Phase]matrixCell{
	{"source", "kill"}: {
		phaul.PhasePreflight: initial,
		phaul.PhaseConnect:   {mode: "precopy", survivor: "source"},
		phaul.PhaseRounds:    {mode: "precopy", survivor: "source"},
		phaul.PhaseDump:      {mode: "precopy", survivor: "source"},
		phaul.PhaseTransfer:  {mode: "precopy", survivor: "source"},
		phaul.PhaseRestore:   {mode: "precopy", survivor: "source"},
		// CRIU's post-dump is not answered yet: it resumes the source;
		// the destination holds its copy in doubt.
		phaul.PhasePrepared: {mode: "precopy", survivor: "source", resolve: "source"},
		// COMMIT never left; the source's copy stays held (CRIU and the
		// frozen hold) and the destination's in doubt: the operator says
		// which runs.
		phaul.PhaseCommit: {mode: "precopy", survivor: "destination", resolve: "destination"},
		// The destination runs and waits for pages only the source's
		// held copy has: phaul recover serves them from it.
		phaul.PhasePostcopy: {mode: "postcopy", survivor: "destination", recover: true},
		phaul.PhaseDone:     {mode: "precopy", survivor: "destination"},
		phaul.PhaseRollback: after,
		phaul.PhaseInDoubt:  after,
	},
	{"destination", "kill"}: {
		phaul.PhasePreflight: initial,
		phaul.PhaseConnect:   {mode: "precopy", survivor: "source"},
		phaul.PhaseRounds:    {mode: "precopy", survivor: "source"},
		phaul.PhaseDump:      {mode: "cold", survivor: "source"}, // a pre-copy destination cannot tell the freeze from the rounds
		phaul.PhaseTransfer:  {mode: "precopy", survivor: "source"},
		phaul.PhaseRestore:   {mode: "precopy", survivor: "source"},
		// PREPARED never left: the source rolls back; the restarted
		// service finds its copy held in doubt.
		phaul.PhasePrepared: {mode: "precopy", survivor: "source", resolve: "source"},
		// COMMIT arrived, the tree had not resumed: the restarted service
		// resumes it, its memory refilled from the images; the source
		// never heard COMMITTED.
		phaul.PhaseCommit: {mode: "precopy", survivor: "destination", resolve: "destination"},
		// The lazy-pages helper outlives the service and keeps the
		// tree's userfaultfds; the restarted service takes the
		// migration over and the source reconnects to it.
		phaul.PhasePostcopy: {mode: "postcopy", survivor: "destination", restart: true},
		phaul.PhaseDone:     {mode: "precopy", survivor: "destination"},
		phaul.PhaseRollback: after,
		phaul.PhaseInDoubt:  after,
	},
	{"source", "criu"}: {
		phaul.PhasePreflight: initial,
		phaul.PhaseConnect:   noCRIU,
		phaul.PhaseRounds:    noCRIU,
		// CRIU is about to freeze the tree (pre-dump), or holds it
		// frozen with post-dump pending: killed, ptrace lets the tree
		// go and it runs on; the dump fails and the migration rolls back.
		phaul.PhaseDump:     {mode: "precopy", survivor: "source"},
		phaul.PhaseTransfer: {mode: "precopy", survivor: "source"},
		phaul.PhaseRestore:  {mode: "precopy", survivor: "source"},
		phaul.PhasePrepared: {mode: "precopy", survivor: "source"},
		// The source's copy is frozen in phaul's hold before COMMIT is
		// sent: CRIU's death does not let it run; phaul kills it after
		// COMMITTED.
		phaul.PhaseCommit: {mode: "precopy", survivor: "destination"},
		// The held tree stays frozen without its CRIU: phaul serves the
		// destination's faults from it (process_vm_readv) to the end.
		phaul.PhasePostcopy: {mode: "postcopy", survivor: "destination"},
		phaul.PhaseDone:     noCRIU,
		phaul.PhaseRollback: after,
		phaul.PhaseInDoubt:  after,
	},
	// The link is cut (ss -K on the source's side of the connection)
	// while the agent is stopped as it enters the state.
	{"source", "cut"}:        cutCells("source"),
	{"destination", "cut"}:   cutCells("destination"),
	{"source", "stall"}:      stallCells,
	{"destination", "stall"}: stallCells,
	{"destination", "criu"}: {
		phaul.PhasePreflight: initial,
		phaul.PhaseConnect:   noCRIU,
		phaul.PhaseRounds:    noCRIU,
		phaul.PhaseDump:      noCRIU,
		phaul.PhaseTransfer:  noCRIU,
		phaul.PhaseRestore:   noCRIU, // entered before CRIU starts
		// CRIU dies holding the rebuilt tree before PREPARED leaves.
		phaul.PhasePrepared: {mode: "precopy", survivor: "source"},
		// CRIU dies holding the rebuilt tree before the resume: the
		// destination answers COMMIT with ABORT, and the source resumes
		// its copy, held until COMMITTED.
		phaul.PhaseCommit:   {mode: "precopy", survivor: "source"},
		phaul.PhasePostcopy: noCRIU, // the tree was resumed at COMMIT: CRIU is gone
		phaul.PhaseDone:     noCRIU,
		phaul.PhaseRollback: after,
		phaul.PhaseInDoubt:  after,
	},
}

var (
	// A short stall changes nothing.
	stallCells = map[phaul.Phase]matrixCell{
		phaul.PhasePreflight: initial,
		phaul.PhaseConnect:   {mode: "precopy", survivor: "destination"},
		phaul.PhaseRounds:    {mode: "precopy", survivor: "destination"},
		phaul.PhaseDump:      {mode: "cold", survivor: "destination"},
		phaul.PhaseTransfer:  {mode: "precopy", survivor: "destination"},
		phaul.PhaseRestore:   {mode: "precopy", survivor: "destination"},
		phaul.PhasePrepared:  {mode: "precopy", survivor: "destination"},
		phaul.PhaseCommit:    {mode: "precopy", survivor: "destination"},
		phaul.PhasePostcopy:  {mode: "postcopy", survivor: "destination"},
		phaul.PhaseDone:      {mode: "precopy", survivor: "destination"},
		phaul.PhaseRollback:  after,
		phaul.PhaseInDoubt:   after,
	}
)

// cutCells: the link is cut as role enters each state. A cut before
// PREPARED reached the source rolls back. A source that has PREPARED ends
// its copy: the destination's held copy is the one, resolved by the
// operator; a destination that has COMMIT runs it, and the source, which
// never heard COMMITTED, is resolved alike. Post-copy reconnects
// (--postcopy-recover-timeout).
func cutCells(role string) map[phaul.Phase]matrixCell {
	cells := map[phaul.Phase]matrixCell{
		phaul.PhasePreflight: initial,
		phaul.PhaseConnect:   {mode: "precopy", survivor: "source"},
		phaul.PhaseRounds:    {mode: "precopy", survivor: "source"},
		phaul.PhaseDump:      {mode: "cold", survivor: "source"},
		phaul.PhaseTransfer:  {mode: "precopy", survivor: "source"},
		phaul.PhaseRestore:   {mode: "precopy", survivor: "source"},
		// The destination enters prepared before PREPARED goes.
		phaul.PhasePrepared: {mode: "precopy", survivor: "source"},
		phaul.PhaseCommit:   {mode: "precopy", survivor: "destination", resolve: "destination"},
		phaul.PhasePostcopy: {mode: "postcopy", survivor: "destination"},
		phaul.PhaseDone:     {mode: "precopy", survivor: "destination"},
		phaul.PhaseRollback: after,
		phaul.PhaseInDoubt:  after,
	}
	if role == "source" {
		cells[phaul.PhaseConnect] = matrixCell{skip: "the source enters connect before it dials: no link to cut yet"}
		cells[phaul.PhasePrepared] = matrixCell{mode: "precopy", survivor: "destination", resolve: "destination"}
	}
	return cells
}

// matrixResult is what a cell printed in the table.
type matrixResult struct {
	f     fault
	phase phaul.Phase
	out   string
}

func TestFaultMatrix(t *testing.T) {
	var phases []phaul.Phase
	for p := phaul.Phase(0); !strings.HasPrefix(p.String(), "phase("); p++ {
		phases = append(phases, p)
	}
	var (
		mu      sync.Mutex
		results []matrixResult
	)
	t.Cleanup(func() { printMatrix(t, phases, results) })
	for _, f := range faults {
		for _, p := range phases {
			c, ok := faultMatrix[f][p]
			if !ok {
				t.Errorf("state %s has no cell for %s: add it to faultMatrix", p, f)
				continue
			}
			t.Run(f.role+"-"+f.action+"/"+p.String(), func(t *testing.T) {
				res := matrixResult{f: f, phase: p, out: skipMark(c)}
				defer func() {
					if t.Failed() {
						res.out = "FAIL"
					}
					mu.Lock()
					results = append(results, res)
					mu.Unlock()
				}()
				if c.skip != "" {
					t.Skipf("SKIP: %s at %s: %s", f, p, c.skip)
				}
				res.out = runCell(t, f, p, c)
			})
		}
	}
}

// runCell runs one cell and returns its line for the table.
func runCell(t *testing.T, f fault, p phaul.Phase, c matrixCell) string {
	e := newEnv(t, testenv.HostsOpts{})
	action := f.action
	pause := filepath.Join(e.dir, "pause")
	if action == "cut" || action == "stall" {
		action = "pause=" + pause
		if err := os.Mkdir(pause, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.WriteFile(filepath.Join(pause, "go"), nil, 0o600) }) // never leave an agent paused
	}
	spec := f.role + ":" + p.String() + ":" + action
	if f.role == "destination" {
		t.Setenv("PHAUL_FAULT_AT", spec)
	}
	e.startServe()
	w := testenv.StartWorkload(t, e.hosts.Src, testenv.WorkloadOpts{MiB: 32, Threads: 2, PagesPerSec: 2000})
	w.WaitProgress(t, 3)
	src := w.PID()
	anchor := e.srcAnchor() // the source netns, whatever runs
	tables := func() []string {
		ts, err := linux.NftTablesIn(anchor)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, tb := range ts {
			names = append(names, tb.String())
		}
		return names
	}
	tablesBefore := tables()
	t.Setenv("PHAUL_FAULT_AT", "")
	if f.role == "source" {
		t.Setenv("PHAUL_FAULT_AT", spec)
	}
	m := e.startMigrate(src, "--mode", c.mode)
	if pausing := strings.HasPrefix(action, "pause"); pausing {
		waitPaused(t, pause, f.role == "source", m)
		if f.action == "cut" {
			out, err := e.hosts.Src.Command(context.Background(), "ss", "-K", "dst", e.hosts.Dst.Addr.String()).CombinedOutput()
			if err != nil {
				t.Fatalf("ss -K: %v\n%s", err, out)
			}
			t.Logf("%s: cut while the %s paused: ss -K:\n%s", time.Now().Format("15:04:05.000"), f.role, out)
		} else {
			time.Sleep(stallFor)
		}
		if err := os.WriteFile(filepath.Join(pause, "go"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if c.restart {
		select {
		case <-e.serveDone:
		case <-time.After(time.Minute):
			t.Fatalf("serve was not killed at %s", p)
		}
		e.startServe() // takes over what the killed one left
	}
	r := m.wait(3 * time.Minute)
	t.Setenv("PHAUL_FAULT_AT", "")
	before, err := w.LastStep()
	if err != nil {
		t.Fatal(err)
	}
	id := migrationID(t, r.out)
	t.Cleanup(func() { removeCgroup(t, id) }) // a failed cell's held copy and its CRIU
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("restore.log:\n%s", logTail(filepath.Join(e.dstWork, id, "restore.log")))
		}
	})
	killed := m.cmd.ProcessState.String() == "signal: killed"
	switch {
	case strings.HasPrefix(action, "pause"):
	case f.action == "criu":
		if killed {
			t.Fatalf("migrate was killed; only a CRIU was to be\n%s", r.out)
		}
	case f.role == "destination" && c.restart:
		if m.cmd.ProcessState.ExitCode() != 0 {
			t.Fatalf("migrate exit %d; the restarted service should have let the post-copy end\n%s\nserve log:\n%s", r.code, r.out, e.readServeLog())
		}
	case f.role == "destination":
		select {
		case <-e.serveDone:
		case <-time.After(time.Minute):
			t.Fatalf("serve was not killed at %s\nmigrate:\n%s", p, r.out)
		}
		if e.serve.ProcessState.String() != "signal: killed" {
			t.Fatalf("serve ended %v, want killed at %s", e.serve.ProcessState, p)
		}
		e.startServe() // recovers what the killed one left
	case !killed:
		t.Fatalf("migrate ended %v (exit %d), want killed at %s\n%s", m.cmd.ProcessState, r.code, p, r.out)
	}

	steps := []string{fmt.Sprintf("migrate %s", migrateEnd(m, r))}
	if c.recover {
		out, code := e.phaul(e.hosts.Src, "recover", "--work-dir", e.srcWork, id)
		t.Logf("phaul recover %s: exit %d\n%s", id, code, out)
		if code != 0 {
			t.Fatalf("phaul recover: exit %d\n%s\nserve log:\n%s", code, out, e.readServeLog())
		}
		steps = append(steps, "phaul recover")
	}
	if c.resolve != "" {
		// As an operator, wait until the destination says it holds
		// the copy in doubt (a lazy restore gets its memory first).
		waitServeLog(t, e, regexp.MustCompile(`migration in doubt|resuming it|committed: tree runs`), time.Minute, nil)
		for _, dir := range []string{e.dstWork, e.srcWork} {
			out, code := e.phaul(e.hostOf(dir), "gc", "--work-dir", dir, "--resolved", id+"="+c.resolve)
			t.Logf("gc --resolved %s=%s %s: exit %d\n%s", id, c.resolve, dir, code, out)
			if code != 0 {
				t.Fatalf("gc --resolved on %s: exit %d\n%s", dir, code, out)
			}
		}
		steps = append(steps, "gc --resolved "+c.resolve)
	}
	for _, dir := range []string{e.srcWork, e.dstWork} {
		out, code := e.phaul(e.hostOf(dir), "gc", "--work-dir", dir)
		t.Logf("gc %s: exit %d\n%s", dir, code, out)
		if code != 0 {
			t.Fatalf("gc %s: exit %d\n%s", dir, code, out)
		}
		if strings.Contains(out, "done:") {
			steps = append(steps, "gc "+map[string]string{e.srcWork: "src", e.dstWork: "dst"}[dir])
		}
	}

	// Exactly one copy runs, the expected one, healthy and past the
	// step it stood at before the fault.
	var running []int
	testenv.WaitFor(t, time.Minute, func() (bool, error) {
		running = runningCopies(t, w)
		return len(running) == 1, w.Health()
	})
	host := e.hosts.Src
	if c.survivor == "destination" {
		host = e.hosts.Dst
	}
	if in, err := host.Contains(running[0]); err != nil || !in {
		t.Fatalf("the running copy %d is not on the %s: %v", running[0], c.survivor, err)
	}
	if c.survivor == "source" && running[0] != src {
		t.Fatalf("copy %d runs at the source, want the original %d", running[0], src)
	}
	testenv.WaitFor(t, time.Minute, func() (bool, error) {
		last, err := w.LastStep()
		if err == nil {
			err = w.Health()
		}
		return last.Verified >= before.Verified+2 && last.N > before.N, err
	})
	w.CheckHealthy(t)
	if after := tables(); !slices.Equal(after, tablesBefore) {
		t.Fatalf("nftables tables in the source netns after the recovery: %v, before: %v", after, tablesBefore)
	}
	for _, dir := range []string{e.srcWork, e.dstWork} {
		if out, code := e.phaul(e.hostOf(dir), "gc", "--work-dir", dir, "--show"); code != 0 || !strings.Contains(out, "nothing left over") {
			t.Fatalf("gc --show %s after the recovery: exit %d\n%s", dir, code, out)
		}
	}
	if c.survivor == "source" {
		if left, err := dirty.Leftovers(src); err != nil || len(left) > 0 {
			t.Fatalf("the workload keeps tracking state after the recovery: %v (%v)", left, err)
		}
		if left := dirNames(t, e.srcWork); len(left) > 0 {
			t.Fatalf("source work dir after gc: %v", left)
		}
		if f.role == "destination" && action != "kill" {
			// The service still carries the fault in its environment.
			e.stopServe()
			e.startServe()
		}
		e.assertMigrated(w, e.migrate(src))
		steps = append(steps, "migrated again")
	}
	t.Logf("cell %s at %s: %s runs; %s", f, p, c.survivor, strings.Join(steps, ", "))
	mark := map[string]string{"source": "src", "destination": "dst"}[c.survivor]
	if c.resolve != "" {
		mark += " (resolved)"
	}
	if c.recover {
		mark += " (recover)"
	}
	if c.survivor == "source" {
		mark += " +again"
	}
	return mark
}

// hostOf is the test host whose work dir dir is.
func (e *env) hostOf(dir string) *testenv.Netns {
	if dir == e.dstWork {
		return e.hosts.Dst
	}
	return e.hosts.Src
}

// migrateEnd says how migrate ended: killed, or its exit status.
func migrateEnd(m *bgMigrate, r result) string {
	if s := m.cmd.ProcessState.String(); s == "signal: killed" {
		return "killed"
	}
	return fmt.Sprintf("exit %d", r.code)
}

// skipMark is a skipped cell's mark in the table.
func skipMark(c matrixCell) string {
	switch c.skip {
	case initial.skip, after.skip:
		return "-"
	case noCRIU.skip:
		return "no CRIU"
	}
	if strings.Contains(c.skip, "no link to cut") {
		return "no link yet"
	}
	return "LOSS (stated)"
}

// printMatrix logs the matrix: a row per state, a column per agent.
func printMatrix(t *testing.T, phases []phaul.Phase, results []matrixResult) {
	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "STATE")
	for _, f := range faults {
		fmt.Fprintf(tw, "\t%s", strings.ToUpper(f.String()))
	}
	fmt.Fprintln(tw)
	cell := func(f fault, p phaul.Phase) string {
		i := slices.IndexFunc(results, func(r matrixResult) bool { return r.f == f && r.phase == p })
		if i < 0 {
			return "not run"
		}
		return results[i].out
	}
	for _, p := range phases {
		fmt.Fprint(tw, p)
		for _, f := range faults {
			fmt.Fprintf(tw, "\t%s", cell(f, p))
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	t.Logf("fault matrix: the fault as the agent enters the state; the copy that runs afterwards, whole "+
		"(src: the source's, migrated again after; dst: the destination's; resolved: an operator's gc --resolved "+
		"on the other end's word; recover: after phaul recover took the post-copy over; LOSS: a loss the docs state; -: no transition enters the state, or only after "+
		"another failure):\n%s", b.String())
}

// waitPaused waits until the agent has paused at the fault (it created
// dir/paused).
func waitPaused(t *testing.T, dir string, isMigrate bool, m *bgMigrate) {
	t.Helper()
	testenv.WaitFor(t, 3*time.Minute, func() (bool, error) {
		select {
		case <-m.done:
			if isMigrate {
				return false, fmt.Errorf("migrate ended before it paused\n%s", m.out)
			}
		default:
		}
		_, err := os.Stat(filepath.Join(dir, "paused"))
		return err == nil, nil
	})
}

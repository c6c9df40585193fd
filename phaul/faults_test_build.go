//go:build phaulfaults

package phaul

import (
	"os"
	"strconv"
	"syscall"
)

// Fault injection for the end-to-end tests, built only with -tags
// phaulfaults (test/harness_test.go builds phaul so; `make build` does
// not, and test/fence_test.go checks that the shipped binary knows none of
// these switches).

// faultDropCollect: with PHAUL_FAULT_DROP_COLLECT=N, what pre-copy round N
// collects is thrown away, as a tracker that missed writes would; the
// end-to-end check of the workload must then fail
// (test/precopy_test.go). 0: off.
func faultDropCollect() int {
	n, _ := strconv.Atoi(os.Getenv("PHAUL_FAULT_DROP_COLLECT"))
	return n
}

// faultKillAt: with PHAUL_FAULT_KILL_AT=ROLE:PHASE (source or
// destination), the agent of that role kills itself with SIGKILL as it
// enters PHASE, once the journal has recorded it and before any of the
// phase's work: the fault matrix's "agent killed at every state".
func faultKillAt(role string, p Phase) {
	if os.Getenv("PHAUL_FAULT_KILL_AT") == role+":"+p.String() {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
}

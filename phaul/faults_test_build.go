//go:build phaulfaults

package phaul

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
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

// faultAt injects the fault matrix's faults (test/matrix_test.go): with
// PHAUL_FAULT_AT=ROLE:PHASE:ACTION, the agent of ROLE (source or
// destination), as it enters PHASE (once the journal has recorded it,
// before any of the phase's work), does ACTION: "kill" kills itself with
// SIGKILL; "criu" kills the CRIU it runs (criuPID; none: nothing);
// "pause=DIR" creates DIR/paused and waits (the phase's work does not
// start) until the test, having cut the link or waited, creates DIR/go.
func faultAt(role string, p Phase, criuPID int) {
	r, rest, _ := strings.Cut(os.Getenv("PHAUL_FAULT_AT"), ":")
	phase, action, _ := strings.Cut(rest, ":")
	action, dir, _ := strings.Cut(action, "=")
	if r != role || phase != p.String() {
		return
	}
	switch action {
	case "kill":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
	case "pause":
		os.WriteFile(dir+"/paused", nil, 0o600)
		for {
			if _, err := os.Stat(dir + "/go"); err == nil {
				return
			}
			time.Sleep(time.Millisecond)
		}
	case "criu":
		if criuPID > 0 {
			syscall.Kill(criuPID, syscall.SIGKILL)
			for i := 0; i < 1000; i++ { // until it is gone (reaped or a zombie)
				if b, err := os.ReadFile("/proc/" + strconv.Itoa(criuPID) + "/stat"); err != nil || strings.Contains(string(b), ") Z ") {
					break
				}
				time.Sleep(time.Millisecond)
			}
		}
	}
}

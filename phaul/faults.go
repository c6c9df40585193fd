//go:build !phaulfaults

package phaul

// Fault injection is compiled only into test builds (-tags phaulfaults,
// faults_test_build.go); the shipped binary has none.

func faultDropCollect() int { return 0 }

func faultAt(role string, p Phase, criuPID int) {}

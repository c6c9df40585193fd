package pagestore

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(victimEnv); dir != "" {
		runVictim(dir) // until killed, or a failed check
		os.Exit(2)
	}
	goleak.VerifyTestMain(m)
}

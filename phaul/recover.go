package phaul

import (
	"fmt"
	"log/slog"
)

// recoverSource resolves, when phaul migrate starts, what unfinished
// migrations left in workDir (gc.go): a tree CRIU still holds for one that
// never committed resumes; images, CRIU's lock once it no longer guards a
// copy in doubt, the throttle's cgroup go. An entry in doubt stays,
// reported. It returns what it did, one line each.
func recoverSource(workDir string, log *slog.Logger) []string {
	rep, err := GC(workDir, GCOptions{Apply: true, Role: RoleSource, Logger: log})
	if err != nil {
		log.Error("journal", "err", err)
		return nil
	}
	var did []string
	for _, l := range rep.Leftovers {
		switch {
		case l.Done:
			did = append(did, fmt.Sprintf("%s %s: %s: %s", l.Migration, l.Kind, l.Action, l.What))
		case l.Err == "" && l.Action == "":
			log.Warn("left for the operator", "migration", l.Migration, "kind", l.Kind, "what", l.What, "why", l.Why)
		}
	}
	return did
}

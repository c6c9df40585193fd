package phaul

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/phaul/phaul/core/linux"
)

// recoverSource resolves, when phaul migrate starts, the source entries of
// workDir's journal that a phaul killed mid-migration left: their images
// go and, once the migration's tree no longer exists (CRIU killed it after
// the destination restored it), so does CRIU's network-lock table, which
// CRIU keeps after such a dump. An entry in doubt stays, reported: only
// the destination's side says which copy lives. A tree that still exists
// is left alone: CRIU resumed it (and unlocked its network) or still holds
// it. It returns what it did, one line each.
func recoverSource(workDir string, log *slog.Logger) []string {
	ents, err := ReadJournal(JournalDir(workDir))
	if err != nil {
		log.Error("journal", "err", err)
		return nil
	}
	var did []string
	for _, e := range ents {
		if e.Role != RoleSource || e.OwnerAlive() {
			continue
		}
		if e.Phase == PhaseInDoubt {
			log.Warn("a previous migration is in doubt: its destination holds the copy; see its log", "migration", e.ID)
			continue
		}
		if err := undoSource(workDir, e); err != nil {
			log.Error("undo a previous migration", "migration", e.ID, "phase", e.Phase, "err", err)
			continue
		}
		did = append(did, fmt.Sprintf("%s: left at %s by pid %d, undone", e.ID, e.Phase, e.Owner))
		log.Warn("undid what a killed migration left on this host", "migration", e.ID, "phase", e.Phase, "owner", e.Owner)
	}
	return did
}

// undoSource removes what e's migration left, then its entry.
func undoSource(workDir string, e JournalEntry) error {
	if e.ImagesDir != "" {
		// Only inside the work dir: the entry names it, phaul made it.
		if rel, err := filepath.Rel(workDir, e.ImagesDir); err != nil || strings.HasPrefix(rel, "..") || rel == "." {
			return fmt.Errorf("images dir %s is not inside %s", e.ImagesDir, workDir)
		}
		if err := os.RemoveAll(e.ImagesDir); err != nil {
			return err
		}
	}
	if e.NftTable != "" {
		t := linux.NftTable{Family: "inet", Name: e.NftTable}
		alive, err := linux.ProcessExists(e.Root)
		if err != nil {
			return err
		}
		switch tables, err := linux.NftTables(); {
		case err != nil:
			return fmt.Errorf("network lock: %w", err)
		case !slices.Contains(tables, t):
			// CRIU's rollback unlocked it (the tree resumed), or it is gone.
		case alive:
			return fmt.Errorf("tree %d still exists, locked by %s: held by a CRIU, left alone", e.Root, t)
		default:
			if err := linux.DeleteNftTable(t); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("network lock %s: %w", t, err)
			}
		}
	}
	err := os.Remove(entryPath(JournalDir(workDir), e.ID, e.Role))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

package phaul

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/phaul/phaul/core/linux"
)

// The journal: each end of a migration keeps one entry, rewritten (to a
// temporary file, fsynced, renamed over, the directory fsynced) at every
// transition before the transition takes effect, and removed once the
// migration has ended cleanly. An entry whose owner (the phaul process
// that wrote it) is gone is an unfinished migration: the next phaul
// command on the host, `phaul serve` at start and `phaul gc` resolve it the
// safe way (recover.go).

// JournalDir is where a work dir keeps its journal.
func JournalDir(workDir string) string { return filepath.Join(workDir, "journal") }

// Roles of a journal entry.
const (
	RoleSource      = "source"
	RoleDestination = "destination"
)

// JournalEntry is what one end knows of a migration.
type JournalEntry struct {
	ID    string `json:"id"`
	Role  string `json:"role"`
	Phase Phase  `json:"phase"`
	Mode  Mode   `json:"mode,omitempty"`
	// Owner is the phaul process driving the migration; OwnerStart its
	// start time (clock ticks since boot), so a reused pid is not taken
	// for it.
	Owner      int    `json:"owner"`
	OwnerStart uint64 `json:"owner_start"`
	// Root is the tree's root (source) or the restored root (destination).
	Root      int    `json:"root,omitempty"`
	ImagesDir string `json:"images_dir,omitempty"`
	// Cgroups are the cgroup directories phaul made for the migration:
	// phaul/NAME in the freezer and cgroup2 hierarchies, or
	// HIERARCHY:phaul/NAME.
	Cgroups []string `json:"cgroups,omitempty"`
	// ThrottleBack is the cpu cgroup auto-converge's throttle moves the
	// tree back to.
	ThrottleBack string `json:"throttle_back,omitempty"`
	// Hold (source) is the frozen cgroup, phaul/NAME of the freezer
	// hierarchy, that keeps the lazily dumped tree stopped whatever its
	// CRIU does (from PREPARED until the tree is killed or resumed);
	// HoldBack the cgroup its processes return to when it resumes.
	Hold     string `json:"hold,omitempty"`
	HoldBack string `json:"hold_back,omitempty"`
	// CRIU is the pid of the CRIU serving the migration while it runs
	// (source: the lazy dump that holds the tree), CRIUStart its start.
	CRIU      int    `json:"criu,omitempty"`
	CRIUStart uint64 `json:"criu_start,omitempty"`
	// CRIUPeerFD (destination) is CRIU's copy of the service's RPC end,
	// in CRIU's fd table, through which a held restore is answered.
	CRIUPeerFD int `json:"criu_peer_fd,omitempty"`
	// CgroupParent (destination) is where a committed tree lives.
	CgroupParent string `json:"cgroup_parent,omitempty"`
	// Lazy (destination): the tree was restored with lazy pages; Memory
	// is what a held one has of them (memory* in hold.go; "" unknown).
	Lazy   bool   `json:"lazy,omitempty"`
	Memory string `json:"memory,omitempty"`
	// LazyHelper (destination) is the process serving a lazy restore's
	// pages (phaul lazy-pages), LazyHelperStart its start; it outlives the
	// service, and the next one takes it over.
	LazyHelper      int    `json:"lazy_helper,omitempty"`
	LazyHelperStart uint64 `json:"lazy_helper_start,omitempty"`
	// Peer (destination) is the SHA-256 of the source's certificate: only
	// that source may resume a post-copy a restarted service took over.
	Peer string `json:"peer,omitempty"`
	// To and TLSDir (source): the destination and the identity, for a
	// phaul recover that takes over a post-copy.
	To     string `json:"to,omitempty"`
	TLSDir string `json:"tls_dir,omitempty"`
	// NftTable is CRIU's network-lock table ("inet CRIU-…"), once known.
	NftTable string    `json:"nft_table,omitempty"`
	Updated  time.Time `json:"updated"`
}

// journal is this process's entry for one migration.
type journal struct {
	mu   sync.Mutex
	path string
	e    JournalEntry
}

var journalName = regexp.MustCompile(`^([0-9a-f]{16})\.(source|destination)\.json$`)

// openJournal starts id's entry for role in dir (created 0700).
func openJournal(dir, id, role string, first JournalEntry) (*journal, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	st, err := linux.ReadProcessStat(os.Getpid())
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	first.ID, first.Role, first.Owner, first.OwnerStart = id, role, os.Getpid(), st.StartTicks
	j := &journal{path: entryPath(dir, id, role), e: first}
	if err := j.write(); err != nil {
		return nil, err
	}
	return j, nil
}

// entryPath is where dir keeps the entry of migration id for role.
func entryPath(dir, id, role string) string { return filepath.Join(dir, id+"."+role+".json") }

// record applies f to the entry and writes it durably. A nil journal
// records nothing.
func (j *journal) record(f func(*JournalEntry)) error {
	if j == nil {
		return nil
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	f(&j.e)
	return j.write()
}

// write replaces the entry's file; callers hold mu (or own j alone).
func (j *journal) write() error {
	j.e.Updated = time.Now().UTC()
	b, err := json.MarshalIndent(j.e, "", "  ")
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if err := writeAtomic(j.path, append(b, '\n')); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// remove drops the entry: the migration ended and left nothing to undo.
func (j *journal) remove() error {
	if j == nil {
		return nil
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	// A post-copy source's remote set (remotefile.go) goes with it.
	if err := os.Remove(remoteBeside(j.path)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("journal: %w", err)
	}
	if err := os.Remove(j.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("journal: %w", err)
	}
	return syncDir(filepath.Dir(j.path))
}

// ReadJournal returns the entries in dir (none if it does not exist). A
// file that does not parse is an error naming it; files that are not
// entries are ignored.
func ReadJournal(dir string) ([]JournalEntry, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	var out []JournalEntry
	for _, d := range ents {
		m := journalName.FindStringSubmatch(d.Name())
		if m == nil || !d.Type().IsRegular() {
			continue
		}
		e, err := ReadEntry(dir, m[1], m[2])
		if err != nil {
			return nil, err
		}
		out = append(out, e)
	}
	return out, nil
}

// ReadEntry reads the entry of migration id for role in dir; one that
// does not exist is fs.ErrNotExist.
func ReadEntry(dir, id, role string) (JournalEntry, error) {
	name := id + "." + role + ".json"
	if !journalName.MatchString(name) {
		return JournalEntry{}, fmt.Errorf("journal: %q is no migration id", id)
	}
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return JournalEntry{}, fmt.Errorf("journal: %w", err)
	}
	var e JournalEntry
	if err := json.Unmarshal(b, &e); err != nil || e.ID != id || e.Role != role {
		return JournalEntry{}, fmt.Errorf("journal: %s: not an entry of %s %s: %v", name, role, id, err)
	}
	return e, nil
}

// OwnerAlive reports whether the process that wrote e still runs.
func (e JournalEntry) OwnerAlive() bool {
	st, err := linux.ReadProcessStat(e.Owner)
	return err == nil && st.StartTicks == e.OwnerStart
}

// CRIUAlive reports whether the CRIU e names still runs.
func (e JournalEntry) CRIUAlive() bool {
	if e.CRIU <= 0 {
		return false
	}
	st, err := linux.ReadProcessStat(e.CRIU)
	return err == nil && (e.CRIUStart == 0 || st.StartTicks == e.CRIUStart)
}

// HelperAlive reports whether e's lazy-pages helper still runs.
func (e JournalEntry) HelperAlive() bool { return processAlive(e.LazyHelper, e.LazyHelperStart) }

// String is one line for logs and gc --show.
func (e JournalEntry) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s %s (owner %d", e.Role, e.ID, e.Phase, e.Owner)
	if !e.OwnerAlive() {
		b.WriteString(", gone")
	}
	b.WriteString(")")
	return b.String()
}

package images

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	criucore "github.com/checkpoint-restore/go-criu/v8/crit/images/criu-core"
	"github.com/checkpoint-restore/go-criu/v8/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v8/crit/images/inventory"
	"github.com/checkpoint-restore/go-criu/v8/crit/images/pstree"
	"google.golang.org/protobuf/proto"
)

// What a restore would make: read from a dump's images before CRIU runs,
// so that a destination can refuse a tree its policy forbids
// (docs: criu-protocols §2, images).

const (
	magicPstree = 0x50273030
	magicCore   = 0x55053847
	magicIDs    = 0x54432030
	// maxTreeTasks bounds the tasks a tree may name before any core image
	// is read.
	maxTreeTasks = 1 << 15
)

// Namespace kinds, as CRIU's task ids name them.
var NamespaceKinds = []string{"pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time"}

// Task is one process of the tree, as its images describe it.
type Task struct {
	Pid uint32
	// UIDs and GIDs: real, effective, saved, filesystem.
	UIDs, GIDs [4]uint32
	// CapEff, CapPrm and CapBnd are the effective, permitted and bounding
	// capability sets, bit n for capability n.
	CapEff, CapPrm, CapBnd uint64
	// HostNS lists the namespace kinds the task shares with the CRIU
	// that dumped it: a restore puts it in the restorer's own.
	HostNS []string
	// Zombie: a dead task, restored only to be reaped (no credentials,
	// memory or namespaces of its own in the images).
	Zombie bool
}

// CRIU's task states (compel's COMPEL_TASK_DEAD, COMPEL_TASK_ZOMBIE).
const (
	taskDead   = 2
	taskZombie = 6
)

// OpenFile is a regular file the tree has open or mapped, by the path CRIU
// reopens on restore.
type OpenFile struct {
	Path  string
	Flags uint32 // open(2) flags
	MntID int32  // the mount in the tree's mount namespace, -1 unknown
}

// TreeFacts is what a restore of the images would create.
type TreeFacts struct {
	Tasks []Task
	Files []OpenFile
}

// ReadTreeFacts reads the tree's tasks (pstree.img, core-PID.img against
// inventory.img's root ids) and regular files (files.img).
func ReadTreeFacts(dir string) (TreeFacts, error) {
	var facts TreeFacts
	rootIDs, err := readRootIDs(dir)
	if err != nil {
		return facts, err
	}
	var pids []uint32
	err = readRecords(filepath.Join(dir, "pstree.img"), magicPstree, func(b []byte) error {
		var e pstree.PstreeEntry
		if err := proto.Unmarshal(b, &e); err != nil {
			return err
		}
		if len(pids) == maxTreeTasks {
			return fmt.Errorf("more than %d tasks", maxTreeTasks)
		}
		pids = append(pids, e.GetPid())
		return nil
	})
	if err != nil {
		return facts, fmt.Errorf("tree facts: %w", err)
	}
	for _, pid := range pids {
		t, err := readTask(dir, pid, rootIDs)
		if err != nil {
			return facts, fmt.Errorf("tree facts: %w", err)
		}
		facts.Tasks = append(facts.Tasks, t)
	}
	err = readRecords(filepath.Join(dir, filesImage), magicFiles, func(b []byte) error {
		var e fdinfo.FileEntry
		if err := proto.Unmarshal(b, &e); err != nil {
			return err
		}
		if e.GetType() != fdinfo.FdTypes_REG || e.GetReg() == nil {
			return nil
		}
		r := e.GetReg()
		if len(r.GetName()) > maxLinkRemapPath {
			return fmt.Errorf("file %d: name of %d bytes", e.GetId(), len(r.GetName()))
		}
		facts.Files = append(facts.Files, OpenFile{Path: r.GetName(), Flags: r.GetFlags(), MntID: r.GetMntId()})
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return facts, fmt.Errorf("tree facts: %w", err)
	}
	return facts, nil
}

// readRootIDs returns the namespaces of the CRIU that dumped the tree.
func readRootIDs(dir string) (*criucore.TaskKobjIdsEntry, error) {
	var ids *criucore.TaskKobjIdsEntry
	err := readInventory(dir, func(e *inventory.InventoryEntry) { ids = e.GetRootIds() })
	if err != nil {
		return nil, err
	}
	if ids == nil {
		return nil, fmt.Errorf("%w: inventory.img has no root ids", ErrInventory)
	}
	return ids, nil
}

// readTask reads core-PID.img.
func readTask(dir string, pid uint32, root *criucore.TaskKobjIdsEntry) (Task, error) {
	t := Task{Pid: pid}
	n := 0
	err := readRecords(filepath.Join(dir, fmt.Sprintf("core-%d.img", pid)), magicCore, func(b []byte) error {
		if n++; n > 1 {
			return errors.New("more than one core entry")
		}
		var e criucore.CoreEntry
		if err := proto.Unmarshal(b, &e); err != nil {
			return err
		}
		if st := e.GetTc().GetTaskState(); st == taskDead || st == taskZombie {
			t.Zombie = true
		}
		if c := e.GetThreadCore().GetCreds(); c != nil {
			t.UIDs = [4]uint32{c.GetUid(), c.GetEuid(), c.GetSuid(), c.GetFsuid()}
			t.GIDs = [4]uint32{c.GetGid(), c.GetEgid(), c.GetSgid(), c.GetFsgid()}
			t.CapEff, t.CapPrm, t.CapBnd = capSet(c.GetCapEff()), capSet(c.GetCapPrm()), capSet(c.GetCapBnd())
		}
		t.HostNS = hostNamespaces(e.GetIds(), root)
		return nil
	})
	if err != nil {
		return t, err
	}
	if n == 0 {
		return t, fmt.Errorf("%w: core-%d.img has no entry", ErrImage, pid)
	}
	if t.HostNS != nil || t.Zombie {
		return t, nil // a zombie has no ids image
	}
	// CRIU writes a task's ids to ids-PID.img.
	err = readRecords(filepath.Join(dir, fmt.Sprintf("ids-%d.img", pid)), magicIDs, func(b []byte) error {
		var ids criucore.TaskKobjIdsEntry
		if err := proto.Unmarshal(b, &ids); err != nil {
			return err
		}
		t.HostNS = hostNamespaces(&ids, root)
		return nil
	})
	if err != nil {
		return t, err
	}
	return t, nil
}

// hostNamespaces lists the kinds in which ids equal root's (the dumping
// CRIU's namespaces); nil without ids.
func hostNamespaces(ids, root *criucore.TaskKobjIdsEntry) []string {
	if ids == nil {
		return nil
	}
	host := []string{}
	for i, pair := range [][2]uint32{
		{ids.GetPidNsId(), root.GetPidNsId()}, {ids.GetNetNsId(), root.GetNetNsId()},
		{ids.GetIpcNsId(), root.GetIpcNsId()}, {ids.GetUtsNsId(), root.GetUtsNsId()},
		{ids.GetMntNsId(), root.GetMntNsId()}, {ids.GetUserNsId(), root.GetUserNsId()},
		{ids.GetCgroupNsId(), root.GetCgroupNsId()}, {ids.GetTimeNsId(), root.GetTimeNsId()},
	} {
		if pair[0] == pair[1] {
			host = append(host, NamespaceKinds[i])
		}
	}
	return host
}

// capSet joins CRIU's 32-bit capability words into one set.
func capSet(words []uint32) uint64 {
	var s uint64
	for i, w := range words {
		if i < 2 {
			s |= uint64(w) << (32 * i)
		}
	}
	return s
}

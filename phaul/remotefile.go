package phaul

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/phaul/phaul/core/pagestore"
)

// The remote set on disk. A post-copy source writes the set of pages only
// its held tree has (remoteSet) beside its journal entry before COMMIT
// leaves, so that a phaul that takes over a post-copy whose migrate died
// (phaul recover) serves exactly those ranges.
//
// Layout, little endian:
//
//	magic "PHRS", u32 version (1), u32 tasks
//	per task: u64 image id, u64 host pid, u32 spans,
//	          per span: u64 start, u64 end (page aligned, start < end,
//	          ascending, disjoint)

const (
	remoteMagic   = "PHRS"
	remoteVersion = 1
	// Bounds on what a remote file may claim before anything is
	// allocated for it.
	maxRemoteTasks = 1 << 16
	maxRemoteSpans = 1 << 24
)

// remotePath is where workDir keeps migration id's remote set: beside
// its source journal entry (remoteBeside), which takes it along.
func remotePath(workDir, id string) string {
	return remoteBeside(entryPath(JournalDir(workDir), id, RoleSource))
}

// remoteBeside names the remote set kept beside the journal entry at path.
func remoteBeside(path string) string { return strings.TrimSuffix(path, ".json") + ".remote" }

// writeRemoteSet writes r to path durably (writeAtomic).
func writeRemoteSet(path string, r *remoteSet) error {
	r.mu.Lock()
	ids := make([]uint64, 0, len(r.tasks))
	for id := range r.tasks {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	b := append([]byte(remoteMagic), 0, 0, 0, 0, 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(b[4:], remoteVersion)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(ids)))
	for _, id := range ids {
		t := r.tasks[id]
		b = binary.LittleEndian.AppendUint64(b, id)
		b = binary.LittleEndian.AppendUint64(b, uint64(t.pid))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(t.spans)))
		for _, s := range t.spans {
			b = binary.LittleEndian.AppendUint64(b, s.start)
			b = binary.LittleEndian.AppendUint64(b, s.end)
		}
	}
	r.mu.Unlock()
	if err := writeAtomic(path, b); err != nil {
		return fmt.Errorf("remote set: %w", err)
	}
	return nil
}

// readRemoteSet reads the remote set at path.
func readRemoteSet(path string) (*remoteSet, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("remote set: %w", err)
	}
	defer f.Close()
	r, err := decodeRemoteSet(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("remote set %s: %w", path, err)
	}
	return r, nil
}

var errRemoteFile = errors.New("malformed remote set")

// decodeRemoteSet checks every count and range before it is used.
func decodeRemoteSet(rd io.Reader) (*remoteSet, error) {
	var hdr [12]byte
	if _, err := io.ReadFull(rd, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: header: %w", errRemoteFile, err)
	}
	if string(hdr[:4]) != remoteMagic || binary.LittleEndian.Uint32(hdr[4:]) != remoteVersion {
		return nil, fmt.Errorf("%w: bad magic or version", errRemoteFile)
	}
	ntasks := binary.LittleEndian.Uint32(hdr[8:])
	if ntasks > maxRemoteTasks {
		return nil, fmt.Errorf("%w: %d tasks", errRemoteFile, ntasks)
	}
	r := newRemoteSet()
	total := 0
	for range ntasks {
		var th [20]byte
		if _, err := io.ReadFull(rd, th[:]); err != nil {
			return nil, fmt.Errorf("%w: task: %w", errRemoteFile, err)
		}
		id, pid := binary.LittleEndian.Uint64(th[:]), binary.LittleEndian.Uint64(th[8:])
		n := int(binary.LittleEndian.Uint32(th[16:]))
		if total += n; total > maxRemoteSpans {
			return nil, fmt.Errorf("%w: more than %d spans", errRemoteFile, maxRemoteSpans)
		}
		if pid == 0 || pid > 1<<22 {
			return nil, fmt.Errorf("%w: task %d: pid %d", errRemoteFile, id, pid)
		}
		if _, dup := r.tasks[id]; dup {
			return nil, fmt.Errorf("%w: task %d twice", errRemoteFile, id)
		}
		t := &remoteTask{pid: int(pid)}
		var prev uint64
		for range n {
			var sb [16]byte
			if _, err := io.ReadFull(rd, sb[:]); err != nil {
				return nil, fmt.Errorf("%w: span: %w", errRemoteFile, err)
			}
			s := span{binary.LittleEndian.Uint64(sb[:]), binary.LittleEndian.Uint64(sb[8:])}
			if s.start >= s.end || s.start%pagestore.PageSize != 0 || s.end%pagestore.PageSize != 0 ||
				(len(t.spans) > 0 && s.start <= prev) {
				return nil, fmt.Errorf("%w: task %d: span [%#x, %#x)", errRemoteFile, id, s.start, s.end)
			}
			prev = s.end
			t.spans = append(t.spans, s)
			r.pages += (s.end - s.start) / pagestore.PageSize
		}
		r.tasks[id] = t
	}
	if _, err := rd.Read(make([]byte, 1)); err != io.EOF {
		return nil, fmt.Errorf("%w: trailing bytes", errRemoteFile)
	}
	return r, nil
}

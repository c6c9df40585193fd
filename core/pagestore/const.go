package pagestore

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// PageSize is the page size of CRIU images on amd64.
const PageSize = 4096

const pageShift = 12

// MaxAddr bounds every page range: vaddr+nrPages*PageSize <= MaxAddr, the
// 57-bit user address space of 5-level paging (also the bound for offsets
// in a shared-memory segment).
const MaxAddr = 1 << 57

// Kind is the type of a pagemap, CRIU's dst_id type byte.
type Kind uint8

const (
	KindTask  Kind = 1 // pagemap-<vpid>.img
	KindShmem Kind = 2 // pagemap-shmem-<shmid>.img
)

// MaxKeys bounds the pagemaps of one Store (tasks and shared-memory
// segments): Commit writes two files for each.
const MaxKeys = 1 << 18

// maxOwnSpools keys get a spool file of their own (one descriptor each);
// the others share one, and Commit copies their pages.
const maxOwnSpools = 64

// writebackChunk: an ordered spool hands its data to writeback in steps of
// this many bytes, so the fsync of Commit finds little left to write.
const writebackChunk = 8 << 20

// maxID bounds Key.ID: CRIU's dst_id is (id << 8) | type in 64 bits.
const maxID = 1<<56 - 1

// Key names one pagemap: a task by its virtual pid, or a shared anonymous
// memory segment by its shmid.
type Key struct {
	Kind Kind
	ID   uint64
}

func (k Key) String() string {
	switch k.Kind {
	case KindTask:
		return fmt.Sprintf("task %d", k.ID)
	case KindShmem:
		return fmt.Sprintf("shmem %d", k.ID)
	}
	return fmt.Sprintf("kind%d %d", k.Kind, k.ID)
}

func (k Key) validate() error {
	switch k.Kind {
	case KindTask:
		if k.ID == 0 || k.ID > math.MaxInt32 {
			return fmt.Errorf("%w: %v: pid out of range", ErrInvalid, k)
		}
	case KindShmem:
		if k.ID > maxID {
			return fmt.Errorf("%w: %v: shmid above 2^56", ErrInvalid, k)
		}
	default:
		return fmt.Errorf("%w: %v: unknown kind", ErrInvalid, k)
	}
	return nil
}

// pagemapName and pagesName are CRIU's image names.
func (k Key) pagemapName() string {
	if k.Kind == KindShmem {
		return fmt.Sprintf("pagemap-shmem-%d.img", k.ID)
	}
	return fmt.Sprintf("pagemap-%d.img", k.ID)
}

func pagesName(pagesID uint32) string { return fmt.Sprintf("pages-%d.img", pagesID) }

// PagesName is the name of the pages image a pagemap's PagesID names.
func PagesName(pagesID uint32) string { return pagesName(pagesID) }

// ParsePagemapName returns the key of a pagemap image's name
// (pagemap-<vpid>.img or pagemap-shmem-<shmid>.img).
func ParsePagemapName(name string) (Key, bool) {
	kind, rest := KindTask, strings.TrimPrefix(name, "pagemap-")
	if rest == name || !strings.HasSuffix(rest, ".img") {
		return Key{}, false
	}
	if r, ok := strings.CutPrefix(rest, "shmem-"); ok {
		kind, rest = KindShmem, r
	}
	id, err := strconv.ParseUint(strings.TrimSuffix(rest, ".img"), 10, 64)
	k := Key{Kind: kind, ID: id}
	return k, err == nil && k.validate() == nil
}

// CRIU pagemap entry flags (PE_*).
const (
	FlagParent  uint32 = 1 // content in a parent image level
	FlagLazy    uint32 = 2 // may be fetched lazily (post-copy)
	FlagPresent uint32 = 4 // content in this level's pages image
)

const flagsMask = FlagParent | FlagLazy | FlagPresent

// validFlags reports whether flags is a combination CRIU writes: PRESENT,
// PRESENT|LAZY, LAZY or PARENT.
func validFlags(flags uint32) bool {
	switch flags {
	case FlagPresent, FlagPresent | FlagLazy, FlagLazy, FlagParent:
		return true
	}
	return false
}

var (
	// ErrInvalid: an argument is out of range (unaligned or overflowing
	// address, page count 0, unknown flags or key, data of the wrong size).
	ErrInvalid = errors.New("pagestore: invalid argument")
	// ErrLimit: the Add would hold more than Config.MaxBytes of page data
	// or record more than Config.MaxPages pages. Nothing was changed.
	ErrLimit = errors.New("pagestore: limit exceeded")
	// ErrNotFound: Read of a page never added.
	ErrNotFound = errors.New("pagestore: page not found")
	// ErrNoContent: Read of a page recorded without content (lazy or in
	// a parent level).
	ErrNoContent = errors.New("pagestore: page has no content here")
	// ErrCommitted: the store was committed (or is being committed); it
	// takes no more pages.
	ErrCommitted = errors.New("pagestore: committed")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("pagestore: closed")
	// ErrBroken: a spool write failed earlier; the store's content is no
	// longer trusted and only Close works.
	ErrBroken = errors.New("pagestore: spool write failed")
	// ErrImage: a pagemap image is malformed (ReadPagemap).
	ErrImage = errors.New("pagestore: malformed pagemap image")
)

// checkRange validates a page range from a caller.
func checkRange(vaddr, nrPages uint64) error {
	switch {
	case vaddr%PageSize != 0:
		return fmt.Errorf("%w: vaddr %#x not page aligned", ErrInvalid, vaddr)
	case nrPages == 0:
		return fmt.Errorf("%w: zero pages at %#x", ErrInvalid, vaddr)
	case vaddr >= MaxAddr || nrPages > (MaxAddr-vaddr)/PageSize:
		return fmt.Errorf("%w: %d pages at %#x end above %#x", ErrInvalid, nrPages, vaddr, uint64(MaxAddr))
	}
	return nil
}

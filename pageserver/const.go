package pageserver

import (
	"errors"
	"fmt"
)

// Command is a page-server command: the low 16 bits of a header's cmd word
// (spec.md §3). Values are CRIU's PS_IOV_* constants.
type Command uint16

const (
	CmdAdd        Command = 1      // pages follow; legacy ADD_F with FlagPresent
	CmdHole       Command = 2      // legacy ADD_F with FlagParent
	CmdOpen       Command = 3      // open a pagemap, no reply
	CmdOpen2      Command = 4      // open a pagemap, reply: 1 byte has_parent
	CmdParent     Command = 5      // reply: int32, does the parent image hold this pagemap
	CmdAddF       Command = 6      // a range with Flags; pages follow iff FlagPresent
	CmdGet        Command = 7      // reply: CmdAddF header + pages
	CmdClose      Command = 0x1023 // end of session, reply: int32 status
	CmdForceClose Command = 0x1024 // CmdClose on a socket the client cannot close
)

func (c Command) String() string {
	switch c {
	case CmdAdd:
		return "ADD"
	case CmdHole:
		return "HOLE"
	case CmdOpen:
		return "OPEN"
	case CmdOpen2:
		return "OPEN2"
	case CmdParent:
		return "PARENT"
	case CmdAddF:
		return "ADD_F"
	case CmdGet:
		return "GET"
	case CmdClose:
		return "CLOSE"
	case CmdForceClose:
		return "FORCE_CLOSE"
	}
	return fmt.Sprintf("Command(%#x)", uint16(c))
}

// known reports whether c is a command of the protocol.
func (c Command) known() bool {
	return (c >= CmdAdd && c <= CmdGet) || c == CmdClose || c == CmdForceClose
}

// Flags are the pagemap-entry bits (CRIU's PE_*) an ADD_F header carries in
// the high 16 bits of its cmd word; the same bits as pagestore's Flag*.
type Flags uint16

const (
	FlagParent  Flags = 1 // the range is in the parent image; no data
	FlagLazy    Flags = 2 // the range may be restored lazily
	FlagPresent Flags = 4 // the range's pages follow the header
)

// validFlags reports whether f is one of the combinations CRIU 4.2 sends
// (spec.md §4.2).
func validFlags(f Flags) bool {
	switch f {
	case FlagPresent, FlagPresent | FlagLazy, FlagLazy, FlagParent:
		return true
	}
	return false
}

// dst_id types (spec.md §4.1).
const (
	typeBits  = 8
	typeTask  = 1
	typeShmem = 2
)

const (
	// PageSize is the size of one page on the wire.
	PageSize = 4096
	// HeaderLen is the size of a CRIU 4.2 header.
	HeaderLen = 32
	// headerLen41 is the size of a CRIU <= 4.1 header, and of the prefix
	// the server reads before it knows which one a peer sends.
	headerLen41 = 24
	// MaxPagesPerIOV bounds nr_pages of every range that carries data and
	// of GET: 16 MiB, four times the largest pipe CRIU fills.
	MaxPagesPerIOV = 4096
	// MaxAddress bounds vaddr + nr_pages*PageSize of every range. Linux
	// user space ends at 2^56 with 5-level paging.
	MaxAddress = 1 << 57
	// MaxPID bounds task ids: the kernel's PID_MAX_LIMIT on 64-bit.
	MaxPID = 1 << 22
)

// Status values of the int32 reply to CmdClose and CmdForceClose.
const (
	statusOK     int32 = 0
	statusFailed int32 = -1
)

var (
	// ErrVersion: the peer sends CRIU <= 4.1's 24-byte headers.
	ErrVersion = errors.New("pageserver: peer speaks CRIU <= 4.1 (24-byte headers), not 4.2")
	// ErrCommand: a header names an unknown command.
	ErrCommand = errors.New("pageserver: unknown command")
	// ErrHeader: a header field breaks spec.md §2-§4 (flags, ids, fields that must be 0).
	ErrHeader = errors.New("pageserver: malformed header")
	// ErrTooLarge: nr_pages exceeds MaxPagesPerIOV where data follows.
	ErrTooLarge = errors.New("pageserver: range too large")
	// ErrAddress: vaddr is not page aligned or the range ends past MaxAddress.
	ErrAddress = errors.New("pageserver: address out of range")
	// ErrNoParent: a FlagParent range for a pagemap without a parent image.
	ErrNoParent = errors.New("pageserver: hole in a pagemap without parent")
	// ErrBusy: another client's session is active on the same images dir.
	ErrBusy = errors.New("pageserver: images dir busy with another client")
	// ErrUnflushed: the peer closed the connection before CLOSE.
	ErrUnflushed = errors.New("pageserver: connection closed before CLOSE")
	// ErrNotFound: a GET asks for pages the store does not hold.
	ErrNotFound = errors.New("pageserver: pages not found")
	// ErrStatus: the server answered CLOSE with a non-zero status.
	ErrStatus = errors.New("pageserver: server reported failure")
	// ErrInsecureListen: a non-loopback listen address without TLS.
	ErrInsecureListen = errors.New("pageserver: non-loopback listen address without TLS")
)

package linux

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// CRIU 4.1 names its lock table after the first 21 characters of the run
// UUID (criu-protocols.md §5.2).
var (
	lockTable = NftTable{Family: "inet", Name: "CRIU-test-1b4e28ba-2fa1-11d2-88"}
	keepTable = NftTable{Family: "ip6", Name: "keep"}
)

// enterNewNetns moves the test goroutine's thread into a new, empty network
// namespace. The goroutine stays locked, so Go ends the thread with the
// test and no other code ever runs in that namespace; the host's tables are
// never touched. Subtests run on other goroutines: each must call it too.
func enterNewNetns(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root to create a network namespace")
	}
	runtime.LockOSThread() // never unlocked: see above
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("SKIP: unshare(CLONE_NEWNET): %v", err)
		}
		t.Fatalf("unshare(CLONE_NEWNET): %v", err)
	}
	if _, err := NftTables(); errors.Is(err, ErrNotSupported) {
		t.Skipf("SKIP: %v", err)
	} else if err != nil {
		t.Fatalf("list tables of a new netns: %v", err)
	}
}

// createLockTables creates, in one transaction in the calling thread's
// netns, lockTable with a CRIU-like input chain (filter hook, policy drop)
// and keepTable.
func createLockTables() error {
	c, err := dialNfnl()
	if err != nil {
		return err
	}
	defer c.close()
	be32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	hook := appendAttr(nil, unix.NFTA_HOOK_HOOKNUM, be32(unix.NF_INET_LOCAL_IN))
	hook = appendAttr(hook, unix.NFTA_HOOK_PRIORITY, be32(0))
	chain := appendStringAttr(nil, unix.NFTA_CHAIN_TABLE, lockTable.Name)
	chain = appendStringAttr(chain, unix.NFTA_CHAIN_NAME, "input")
	chain = appendAttr(chain, unix.NFTA_CHAIN_HOOK|unix.NLA_F_NESTED, hook)
	chain = appendAttr(chain, unix.NFTA_CHAIN_POLICY, be32(0)) // NF_DROP
	chain = appendStringAttr(chain, unix.NFTA_CHAIN_TYPE, "filter")
	return c.batch(
		nftOp{unix.NFT_MSG_NEWTABLE, unix.NLM_F_CREATE | unix.NLM_F_EXCL, unix.NFPROTO_INET,
			appendStringAttr(nil, unix.NFTA_TABLE_NAME, lockTable.Name)},
		nftOp{unix.NFT_MSG_NEWCHAIN, unix.NLM_F_CREATE | unix.NLM_F_EXCL, unix.NFPROTO_INET, chain},
		nftOp{unix.NFT_MSG_NEWTABLE, unix.NLM_F_CREATE | unix.NLM_F_EXCL, unix.NFPROTO_IPV6,
			appendStringAttr(nil, unix.NFTA_TABLE_NAME, keepTable.Name)},
	)
}

func sortedTables(ts []NftTable) []NftTable {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, func(a, b NftTable) int { return strings.Compare(a.String(), b.String()) })
	return ts
}

func wantTables(t *testing.T, got []NftTable, err error, want ...NftTable) {
	t.Helper()
	if err != nil {
		t.Fatalf("list tables: %v", err)
	}
	if got, want := sortedTables(got), sortedTables(want); !slices.Equal(got, want) {
		t.Fatalf("tables = %v, want %v", got, want)
	}
}

func TestNftTables(t *testing.T) {
	enterNewNetns(t)
	before := countFDs(t)
	if err := createLockTables(); err != nil {
		t.Fatalf("create tables: %v", err)
	}
	// A second create of the same table must fail: acks carry errors.
	if err := createLockTables(); !errors.Is(err, unix.EEXIST) {
		t.Fatalf("create tables again: %v, want EEXIST", err)
	}
	got, err := NftTables()
	wantTables(t, got, err, lockTable, keepTable)

	if err := DeleteNftTable(lockTable); err != nil {
		t.Fatalf("delete %v: %v", lockTable, err)
	}
	got, err = NftTables()
	wantTables(t, got, err, keepTable)

	if err := DeleteNftTable(lockTable); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("delete %v again: %v, want fs.ErrNotExist", lockTable, err)
	}
	// The family is part of the name: "ip6 keep" is not "inet keep".
	if err := DeleteNftTable(NftTable{Family: "inet", Name: keepTable.Name}); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("delete inet %s: %v, want fs.ErrNotExist", keepTable.Name, err)
	}
	if after := countFDs(t); after != before {
		t.Errorf("%d fds before, %d after", before, after)
	}
}

func TestDeleteNftTableRefuses(t *testing.T) {
	tests := []struct {
		name  string
		table NftTable
	}{
		{"empty name", NftTable{Family: "inet"}}, // the kernel would flush the family
		{"unspec family", NftTable{Family: "0", Name: "x"}},
		{"unknown family", NftTable{Family: "ipx", Name: "x"}},
		{"NUL in name", NftTable{Family: "inet", Name: "a\x00b"}},
		{"name too long", NftTable{Family: "inet", Name: strings.Repeat("x", nftNameMaxBytes)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			enterNewNetns(t) // should a check fail, still not the host's tables
			if err := createLockTables(); err != nil {
				t.Fatalf("create tables: %v", err)
			}
			if err := DeleteNftTable(tt.table); !errors.Is(err, unix.EINVAL) {
				t.Fatalf("delete %q: %v, want EINVAL", tt.table, err)
			}
			got, err := NftTables()
			wantTables(t, got, err, lockTable, keepTable)
		})
	}
}

// TestNftTablesIn works from the host netns on the tables of a thread in
// another one, and checks that the caller's thread stays where it was.
func TestNftTablesIn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root to create a network namespace")
	}
	type holder struct {
		tid int
		err error
	}
	ready, stop, done := make(chan holder, 1), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread leaves the host netns
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- holder{err: err}
			return
		}
		if err := createLockTables(); err != nil {
			ready <- holder{err: err}
			return
		}
		ready <- holder{tid: unix.Gettid()}
		<-stop
	}()
	t.Cleanup(func() { close(stop); <-done })
	h := <-ready
	switch {
	case errors.Is(h.err, unix.EPERM), errors.Is(h.err, ErrNotSupported):
		t.Skipf("SKIP: %v", h.err)
	case h.err != nil:
		t.Fatalf("netns holder: %v", h.err)
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	netnsBefore, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	got, err := NftTablesIn(h.tid)
	wantTables(t, got, err, lockTable, keepTable)
	if err := DeleteNftTableIn(h.tid, lockTable); err != nil {
		t.Fatalf("delete %v in %d: %v", lockTable, h.tid, err)
	}
	got, err = NftTablesIn(h.tid)
	wantTables(t, got, err, keepTable)
	if err := DeleteNftTableIn(h.tid, lockTable); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("delete %v in %d again: %v, want fs.ErrNotExist", lockTable, h.tid, err)
	}
	if netnsAfter, err := os.Readlink("/proc/thread-self/ns/net"); err != nil || netnsAfter != netnsBefore {
		t.Fatalf("caller's netns %s before, %s after (%v)", netnsBefore, netnsAfter, err)
	}
	if _, err := NftTablesIn(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("tables of no process: %v, want fs.ErrNotExist", err)
	}
}

func TestNftFamilies(t *testing.T) {
	tests := []struct {
		num  uint8
		name string
	}{
		{1, "inet"}, {2, "ip"}, {3, "arp"}, {5, "netdev"}, {7, "bridge"}, {10, "ip6"}, {4, "4"}, {255, "255"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := nftFamilyName(tt.num); got != tt.name {
				t.Errorf("nftFamilyName(%d) = %q, want %q", tt.num, got, tt.name)
			}
			if got, err := nftFamilyNumber(tt.name); err != nil || got != tt.num {
				t.Errorf("nftFamilyNumber(%q) = %d, %v, want %d", tt.name, got, err, tt.num)
			}
		})
	}
}

// realDump is a GETTABLE dump reply from Linux 6.18 (seq 0x6b16dfa3): one
// datagram with "inet CRIU-1b4e28ba-2fa1-11d2-88" and "ip6 keep"
// (NLM_F_MULTI), then a datagram with NLMSG_DONE.
var realDump = [...]string{
	"50000000000a0200a3df166b6f500000010000021f000100435249552d31623465323862612d326661312d313164322d3838000008000300000000010c000400000000000000000108000200000000003c000000000a0200a3df166b6f5000000a000002090001006b6565700000000008000300000000000c00040000000000000000020800020000000000",
	"1400000003000200a3df166b6f50000000000000",
}

const realDumpSeq = 0x6b16dfa3

func mustHex(tb testing.TB, s string) []byte {
	tb.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// appendNlStatus appends NLMSG_DONE or NLMSG_ERROR carrying error code e;
// an NLMSG_ERROR also carries the header of the failed request.
func appendNlStatus(b []byte, typ uint16, seq uint32, e int32) []byte {
	n := unix.SizeofNlMsghdr + 4
	if typ == unix.NLMSG_ERROR {
		n += unix.SizeofNlMsghdr
	}
	b = binary.NativeEndian.AppendUint32(b, uint32(n))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_MULTI)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0)
	b = binary.NativeEndian.AppendUint32(b, uint32(e))
	if typ == unix.NLMSG_ERROR {
		b = append(b, make([]byte, unix.SizeofNlMsghdr)...)
	}
	return b
}

// appendTableMsg appends the NFT_MSG_NEWTABLE message a dump gives for t.
func appendTableMsg(tb testing.TB, b []byte, seq uint32, t NftTable, flags uint16) []byte {
	tb.Helper()
	fam, err := nftFamilyNumber(t.Family)
	if t.Family == "0" {
		fam, err = 0, nil // decodes, though DeleteNftTable refuses it
	}
	if err != nil {
		tb.Fatal(err)
	}
	return appendNfMsg(b, nftMsgType(unix.NFT_MSG_NEWTABLE), unix.NLM_F_MULTI|flags, seq, fam, 0,
		appendStringAttr(nil, unix.NFTA_TABLE_NAME, t.Name))
}

func TestNftDecode(t *testing.T) {
	const seq = 7
	table := appendTableMsg(t, nil, seq, lockTable, 0)
	tests := []struct {
		name     string
		seq      uint32 // of the request; 0: seq
		in       []byte
		want     []NftTable
		wantDone bool
		wantIntr bool
		wantErr  error // nil: none; errAny: some error
	}{
		{"real", realDumpSeq, mustHex(t, realDump[0]), []NftTable{{"inet", "CRIU-1b4e28ba-2fa1-11d2-88"}, {"ip6", "keep"}}, false, false, nil},
		{"real done", realDumpSeq, mustHex(t, realDump[1]), nil, true, false, nil},
		{"done", 0, appendNlStatus(nil, unix.NLMSG_DONE, seq, 0), nil, true, false, nil},
		{"tables then done", 0, appendNlStatus(slices.Clone(table), unix.NLMSG_DONE, seq, 0), []NftTable{lockTable}, true, false, nil},
		{"dump error", 0, appendNlStatus(nil, unix.NLMSG_DONE, seq, -int32(unix.EINVAL)), nil, true, false, unix.EINVAL},
		{"error message", 0, appendNlStatus(nil, unix.NLMSG_ERROR, seq, -int32(unix.EPERM)), nil, false, false, unix.EPERM},
		{"ack ignored", 0, appendNlStatus(slices.Clone(table), unix.NLMSG_ERROR, seq, 0), []NftTable{lockTable}, false, false, nil},
		{"other seq ignored", 0, appendTableMsg(t, nil, seq+1, lockTable, 0), nil, false, false, nil},
		{"interrupted", 0, appendTableMsg(t, nil, seq, lockTable, unix.NLM_F_DUMP_INTR), []NftTable{lockTable}, false, true, nil},
		{"unknown family", 0, appendTableMsg(t, nil, seq, NftTable{"4", "x"}, 0), []NftTable{{"4", "x"}}, false, false, nil},
		{"empty", 0, nil, nil, false, false, nil},
		{"short header", 0, table[:15], nil, false, false, errAny},
		{"message longer than datagram", 0, table[:len(table)-1], nil, false, false, errAny},
		{"message shorter than header", 0, append([]byte{15, 0, 0, 0}, table[4:]...), nil, false, false, errAny},
		{"attribute longer than message", 0, func() []byte {
			b := slices.Clone(table)
			binary.NativeEndian.PutUint16(b[20:], 0xff) // first attribute's length
			return b
		}(), nil, false, false, errAny},
		{"no name", 0, appendNfMsg(nil, nftMsgType(unix.NFT_MSG_NEWTABLE), 0, seq, 1, 0, nil), nil, false, false, errAny},
		{"error code out of range", 0, appendNlStatus(nil, unix.NLMSG_DONE, seq, -5000), nil, true, false, errAny},
		{"positive error code", 0, appendNlStatus(nil, unix.NLMSG_ERROR, seq, 1), nil, false, false, errAny},
		{"short error message", 0, appendNlStatus(nil, unix.NLMSG_ERROR, seq, 0)[:unix.SizeofNlMsghdr+3], nil, false, false, errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tableDump{seq: seq}
			if tt.seq != 0 {
				d.seq = tt.seq
			}
			done, err := d.decode(tt.in)
			switch {
			case tt.wantErr == errAny && err == nil:
				t.Fatalf("decode: no error, tables %v", d.tables)
			case tt.wantErr == errAny:
				return
			case tt.wantErr == nil && err != nil, tt.wantErr != nil && !errors.Is(err, tt.wantErr):
				t.Fatalf("decode: %v, want %v", err, tt.wantErr)
			}
			if done != tt.wantDone || d.intr != tt.wantIntr || !slices.Equal(d.tables, tt.want) {
				t.Fatalf("decode = %v done %v intr %v, want %v done %v intr %v",
					d.tables, done, d.intr, tt.want, tt.wantDone, tt.wantIntr)
			}
		})
	}
}

var errAny = errors.New("any error")

// FuzzNftDecode feeds datagrams to the dump decoder; whatever it accepts
// must survive re-encoding unchanged.
func FuzzNftDecode(f *testing.F) {
	for _, s := range realDump {
		f.Add(mustHex(f, s))
	}
	f.Add(appendNlStatus(nil, unix.NLMSG_ERROR, realDumpSeq, -int32(unix.EPERM)))
	f.Add(appendTableMsg(f, nil, realDumpSeq, NftTable{"255", strings.Repeat("x", nftNameMaxBytes-1)}, unix.NLM_F_DUMP_INTR))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0xa3, 0xdf, 0x16, 0x6b, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		d := tableDump{seq: realDumpSeq}
		done, err := d.decode(in)
		if err != nil {
			return
		}
		var b []byte
		for _, tb := range d.tables {
			b = appendTableMsg(t, b, realDumpSeq, tb, 0)
		}
		if done {
			b = appendNlStatus(b, unix.NLMSG_DONE, realDumpSeq, 0)
		}
		d2 := tableDump{seq: realDumpSeq}
		done2, err := d2.decode(b)
		if err != nil || done2 != done || !slices.Equal(d2.tables, d.tables) {
			t.Fatalf("round trip of %v done %v: %v done %v, %v", d.tables, done, d2.tables, done2, err)
		}
	})
}

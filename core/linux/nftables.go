package linux

import (
	"bytes"
	"errors"
	"fmt"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// CRIU's --network-lock nftables leaves a table "inet CRIU-<id>" behind
// after a dump that killed the tree (criu-protocols.md §5.2); phaul gc
// finds and deletes it here, over raw NETLINK_NETFILTER
// (nftables_netlink.go): a hand-written codec for two requests is smaller
// than a new dependency such as github.com/google/nftables.

// NftTable names one nftables table.
type NftTable struct {
	Family string // "inet", "ip", "ip6", "arp", "bridge", "netdev", or a decimal NFPROTO_* number
	Name   string
}

// String names t as nft(8) does: "inet CRIU-1b4e28ba-2fa1-11d2-88".
func (t NftTable) String() string { return t.Family + " " + t.Name }

// NftTables lists every nftables table, of every family, in the calling
// thread's network namespace. It needs CAP_NET_ADMIN there (else an error
// wrapping unix.EPERM). A kernel without nfnetlink or nf_tables gives an
// error wrapping ErrNotSupported.
func NftTables() ([]NftTable, error) {
	c, err := dialNfnl()
	if err != nil {
		return nil, err
	}
	defer c.close()
	// A dump that raced with a ruleset change is marked NLM_F_DUMP_INTR and
	// may miss or repeat tables; nft(8) retries too.
	for range 3 {
		d := tableDump{seq: c.nextSeq()}
		req := appendNfMsg(nil, nftMsgType(unix.NFT_MSG_GETTABLE), unix.NLM_F_REQUEST|unix.NLM_F_DUMP,
			d.seq, unix.NFPROTO_UNSPEC, 0, nil)
		if err := c.send(req); err != nil {
			return nil, fmt.Errorf("list nftables tables: %w", err)
		}
		for done := false; !done; {
			b, err := c.recv()
			if err != nil {
				return nil, fmt.Errorf("list nftables tables: %w", err)
			}
			if done, err = d.decode(b); err != nil {
				return nil, fmt.Errorf("list nftables tables: %w", nftNotSupported(err, unix.EINVAL))
			}
		}
		if !d.intr {
			return d.tables, nil
		}
	}
	return nil, fmt.Errorf("list nftables tables: ruleset kept changing: %w", unix.EINTR)
}

// DeleteNftTable deletes table t with its chains, sets and rules in the
// calling thread's network namespace, in one nftables transaction. A table
// that does not exist is an error wrapping fs.ErrNotExist (unix.ENOENT); an
// empty or over-long name or an unknown family one wrapping unix.EINVAL,
// checked before anything is sent. Permissions and a kernel without
// nf_tables are reported as by NftTables.
func DeleteNftTable(t NftTable) error {
	fam, err := nftFamilyNumber(t.Family)
	if err != nil {
		return fmt.Errorf("delete nftables table %s: %w", t, err)
	}
	// Without a name the kernel would flush every table of the family.
	if t.Name == "" || len(t.Name) >= nftNameMaxBytes || bytes.IndexByte([]byte(t.Name), 0) >= 0 {
		return fmt.Errorf("delete nftables table %s: bad name %q: %w", t, t.Name, unix.EINVAL)
	}
	c, err := dialNfnl()
	if err != nil {
		return err
	}
	defer c.close()
	attrs := appendStringAttr(nil, unix.NFTA_TABLE_NAME, t.Name)
	if err := c.batch(nftOp{unix.NFT_MSG_DELTABLE, 0, fam, attrs}); err != nil {
		return fmt.Errorf("delete nftables table %s: %w", t, nftNotSupported(err, unix.EOPNOTSUPP))
	}
	return nil
}

// NftTablesIn is NftTables in the network namespace of process pid
// (/proc/pid/ns/net; a thread id works too). It runs on an OS thread of
// its own that joins that namespace and is thrown away afterwards, so the
// caller's threads never change namespace. A process that does not exist is an error wrapping
// fs.ErrNotExist.
func NftTablesIn(pid int) ([]NftTable, error) {
	var tables []NftTable
	err := inNetns(pid, func() (err error) {
		tables, err = NftTables()
		return err
	})
	return tables, err
}

// DeleteNftTableIn is DeleteNftTable in the network namespace of process
// pid, as NftTablesIn. fs.ErrNotExist means that the table or the process
// does not exist.
func DeleteNftTableIn(pid int, t NftTable) error {
	return inNetns(pid, func() error { return DeleteNftTable(t) })
}

// InNetns runs fn on an OS thread that has joined the network namespace
// of pid (sockets fn creates belong to that namespace for good).
func InNetns(pid int, fn func() error) error { return inNetns(pid, fn) }

// inNetns runs fn on an OS thread that has joined the network namespace of
// pid. The thread stays locked, so Go ends it when the goroutine returns
// instead of handing it, in the wrong namespace, to other goroutines.
func inNetns(pid int, fn func() error) error {
	path := "/proc/" + strconv.Itoa(pid) + "/ns/net"
	ns, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("netns of %d: open %s: %w", pid, path, err)
	}
	defer unix.Close(ns)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("netns of %d: setns: %w", pid, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

const (
	nfgenmsgBytes   = 4       // struct nfgenmsg
	nftNameMaxBytes = 256     // NFT_NAME_MAXLEN, with the NUL
	maxNftTables    = 1 << 16 // bounds what one dump may make us keep
)

// nftNotSupported marks errno as the answer of a kernel with nfnetlink
// but without nf_tables: a request to a missing subsystem gets EINVAL, a
// batch for it EOPNOTSUPP (net/netfilter/nfnetlink.c).
func nftNotSupported(err error, errno unix.Errno) error {
	if errors.Is(err, errno) {
		return fmt.Errorf("%w (kernel without nf_tables): %w", ErrNotSupported, err)
	}
	return err
}

func nftMsgType(msg uint16) uint16 { return unix.NFNL_SUBSYS_NFTABLES<<8 | msg }

// nftFamilyName gives nft(8)'s name for an NFPROTO_* number.
func nftFamilyName(f uint8) string {
	switch f {
	case unix.NFPROTO_INET:
		return "inet"
	case unix.NFPROTO_IPV4:
		return "ip"
	case unix.NFPROTO_ARP:
		return "arp"
	case unix.NFPROTO_NETDEV:
		return "netdev"
	case unix.NFPROTO_BRIDGE:
		return "bridge"
	case unix.NFPROTO_IPV6:
		return "ip6"
	}
	return strconv.Itoa(int(f))
}

// nftFamilyNumber inverts nftFamilyName. NFPROTO_UNSPEC is refused: a
// delete with it could match more than one table.
func nftFamilyNumber(s string) (uint8, error) {
	for f := 1; f < 256; f++ {
		if nftFamilyName(uint8(f)) == s {
			return uint8(f), nil
		}
	}
	return 0, fmt.Errorf("unknown nftables family %q: %w", s, unix.EINVAL)
}

// tableDump collects the replies to one NFT_MSG_GETTABLE dump.
type tableDump struct {
	seq    uint32 // of the request; other messages are not ours
	tables []NftTable
	intr   bool // NLM_F_DUMP_INTR: the ruleset changed during the dump
}

// decode takes one datagram of the dump; done reports NLMSG_DONE.
func (d *tableDump) decode(b []byte) (done bool, err error) {
	msgs, err := parseNlMsgs(b)
	if err != nil {
		return false, err
	}
	for _, m := range msgs {
		if m.seq != d.seq {
			continue
		}
		if m.flags&unix.NLM_F_DUMP_INTR != 0 {
			d.intr = true
		}
		switch m.typ {
		case unix.NLMSG_DONE:
			// The payload, if any, is the dump's final error code.
			if len(m.data) == 0 {
				return true, nil
			}
			return true, decodeNlErr(m.data)
		case unix.NLMSG_ERROR:
			if err := decodeNlErr(m.data); err != nil {
				return false, err
			}
		case nftMsgType(unix.NFT_MSG_NEWTABLE):
			t, err := decodeTable(m.data)
			if err != nil {
				return false, err
			}
			if len(d.tables) == maxNftTables {
				return false, fmt.Errorf("more than %d nftables tables", maxNftTables)
			}
			d.tables = append(d.tables, t)
		}
	}
	return false, nil
}

// decodeTable decodes an NFT_MSG_NEWTABLE payload: nfgenmsg, attributes.
func decodeTable(data []byte) (NftTable, error) {
	if len(data) < nfgenmsgBytes {
		return NftTable{}, fmt.Errorf("nftables table message of %d bytes", len(data))
	}
	var name []byte
	if err := parseAttrs(data[nfgenmsgBytes:], func(typ uint16, val []byte) {
		if typ == unix.NFTA_TABLE_NAME {
			name, _, _ = bytes.Cut(val, []byte{0})
		}
	}); err != nil {
		return NftTable{}, err
	}
	if len(name) == 0 || len(name) >= nftNameMaxBytes {
		return NftTable{}, fmt.Errorf("nftables table name of %d bytes", len(name))
	}
	return NftTable{Family: nftFamilyName(data[0]), Name: string(name)}, nil
}

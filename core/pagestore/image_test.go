package pagestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	pmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/pagemap"
	"google.golang.org/protobuf/proto"
)

// image builds a pagemap image from raw records.
func image(magic2 uint32, recs ...[]byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, magicImgCommon)
	b = binary.LittleEndian.AppendUint32(b, magic2)
	for _, r := range recs {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(r)))
		b = append(b, r...)
	}
	return b
}

func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadPagemapRoundTrip(t *testing.T) {
	m := &Pagemap{PagesID: 7, Entries: []Entry{
		{0x1000, 2, FlagParent}, {0x3000, 1, FlagPresent | FlagLazy}, {0x4000, 1 << 20, FlagPresent},
		{MaxAddr - PageSize, 1, FlagLazy},
	}}
	img, err := appendPagemap(nil, m)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ReadPagemap(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	if got.PagesID != m.PagesID || !slices.Equal(got.Entries, m.Entries) {
		t.Fatalf("read %+v, wrote %+v", got, m)
	}
}

// TestReadPagemapCompat reads entries as CRIU 4.1 wrote them.
func TestReadPagemapCompat(t *testing.T) {
	head := marshal(t, &pmimg.PagemapHead{PagesId: proto.Uint32(3)})
	img := image(magicPagemap, head,
		marshal(t, &pmimg.PagemapEntry{Vaddr: proto.Uint64(0x1000), CompatNrPages: proto.Uint32(2)}),
		marshal(t, &pmimg.PagemapEntry{Vaddr: proto.Uint64(0x3000), CompatNrPages: proto.Uint32(1), InParent: proto.Bool(true)}),
		marshal(t, &pmimg.PagemapEntry{Vaddr: proto.Uint64(0x4000), CompatNrPages: proto.Uint32(1), Flags: proto.Uint32(6)}),
		marshal(t, &pmimg.PagemapEntry{Vaddr: proto.Uint64(0x5000), CompatNrPages: proto.Uint32(9), NrPages: proto.Uint64(2), Flags: proto.Uint32(4)}),
	)
	got, err := ReadPagemap(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{{0x1000, 2, FlagPresent}, {0x3000, 1, FlagParent}, {0x4000, 1, FlagPresent | FlagLazy}, {0x5000, 2, FlagPresent}}
	if got.PagesID != 3 || !slices.Equal(got.Entries, want) {
		t.Fatalf("read %+v, want %v", got, want)
	}
}

func TestReadPagemapBadInput(t *testing.T) {
	head := marshal(t, &pmimg.PagemapHead{PagesId: proto.Uint32(1)})
	entry := func(vaddr, n uint64, flags uint32) []byte {
		return marshal(t, &pmimg.PagemapEntry{Vaddr: proto.Uint64(vaddr), CompatNrPages: proto.Uint32(0),
			NrPages: proto.Uint64(n), Flags: proto.Uint32(flags)})
	}
	good := image(magicPagemap, head, entry(0x1000, 1, FlagPresent))
	tests := []struct {
		name string
		img  []byte
	}{
		{"empty", nil},
		{"short magic", good[:6]},
		{"wrong magic", image(0x57492820, head)},
		{"no head", good[:8]},
		{"torn size", good[:len(good)-len(entry(0x1000, 1, FlagPresent))-2]},
		{"torn record", good[:len(good)-1]},
		{"huge record", append(slices.Clone(good), 0xff, 0xff, 0xff, 0xff)},
		{"record just over the bound", image(magicPagemap, head, make([]byte, maxRecordBytes+1))},
		{"head not protobuf", image(magicPagemap, []byte{0xff, 0xff})},
		{"head without pages_id", image(magicPagemap, nil)},
		{"entry missing vaddr", image(magicPagemap, head, marshalPartial(t, &pmimg.PagemapEntry{CompatNrPages: proto.Uint32(1)}))},
		{"zero pages", image(magicPagemap, head, entry(0x1000, 0, FlagPresent))},
		{"unaligned", image(magicPagemap, head, entry(0x1001, 1, FlagPresent))},
		{"beyond the address space", image(magicPagemap, head, entry(MaxAddr-PageSize, 2, FlagPresent))},
		{"count wraps", image(magicPagemap, head, entry(0x1000, 1<<63, FlagPresent))},
		{"bad flags", image(magicPagemap, head, entry(0x1000, 1, 8))},
		{"parent and present", image(magicPagemap, head, entry(0x1000, 1, FlagParent|FlagPresent))},
		{"overlap", image(magicPagemap, head, entry(0x1000, 2, FlagPresent), entry(0x2000, 1, FlagPresent))},
		{"unsorted", image(magicPagemap, head, entry(0x3000, 1, FlagPresent), entry(0x1000, 1, FlagPresent))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if m, err := ReadPagemap(bytes.NewReader(tt.img)); !errors.Is(err, ErrImage) {
				t.Fatalf("read: %+v, %v; want ErrImage", m, err)
			}
		})
	}
}

func marshalPartial(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{AllowPartial: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadPagemapMaxEntries(t *testing.T) {
	const max = 1000
	m := &Pagemap{PagesID: 1}
	for i := range max + 1 {
		m.Entries = append(m.Entries, Entry{Vaddr: uint64(i) * 2 * PageSize, NrPages: 1, Flags: FlagPresent})
	}
	for _, n := range []int{max, max + 1} {
		img, err := appendPagemap(nil, &Pagemap{PagesID: 1, Entries: m.Entries[:n]})
		if err != nil {
			t.Fatal(err)
		}
		_, err = readPagemap(bytes.NewReader(img), max)
		if n == max && err != nil {
			t.Fatalf("read %d entries: %v", n, err)
		}
		if n > max && !errors.Is(err, ErrImage) {
			t.Fatalf("read %d entries: %v, want ErrImage", n, err)
		}
	}
}

// FuzzReadPagemap: the reader never panics nor allocates beyond its
// bounds, and what it accepts survives a write and a second read.
func FuzzReadPagemap(f *testing.F) {
	head := marshal(f, &pmimg.PagemapHead{PagesId: proto.Uint32(1)})
	for _, m := range []*Pagemap{
		{PagesID: 1},
		{PagesID: 2, Entries: []Entry{{0x1000, 2, FlagParent}, {0x3000, 1, FlagPresent | FlagLazy}}},
		{PagesID: 3, Entries: []Entry{{MaxAddr - PageSize, 1, FlagLazy}}},
	} {
		img, err := appendPagemap(nil, m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(img)
	}
	f.Add(image(magicPagemap, head, marshal(f, &pmimg.PagemapEntry{Vaddr: proto.Uint64(0x1000), CompatNrPages: proto.Uint32(5)})))
	f.Add(image(magicPagemap, head, []byte{0x08, 0x80, 0x20, 0x10, 0x00, 0x28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}))
	f.Add(append(image(magicPagemap, head), 0xff, 0xff, 0xff, 0x7f))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		m, err := ReadPagemap(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrImage) {
				t.Fatalf("error %v does not wrap ErrImage", err)
			}
			return
		}
		img, err := appendPagemap(nil, m)
		if err != nil {
			t.Fatalf("write back %+v: %v", m, err)
		}
		m2, err := ReadPagemap(bytes.NewReader(img))
		if err != nil || m2.PagesID != m.PagesID || !slices.Equal(m2.Entries, m.Entries) {
			t.Fatalf("round trip changed %+v to %+v: %v", m, m2, err)
		}
	})
}

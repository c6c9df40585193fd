package lazy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	corex86 "github.com/checkpoint-restore/go-criu/v8/crit/images/core-x86"
	criucore "github.com/checkpoint-restore/go-criu/v8/crit/images/criu-core"
	mmimg "github.com/checkpoint-restore/go-criu/v8/crit/images/mm"
	"google.golang.org/protobuf/proto"
)

// coreImage encodes a core-<tid>.img whose thread has stack pointer sp
// (only the fields phaul reads).
func coreImage(t testing.TB, sp uint64) []byte {
	c := &criucore.CoreEntry{ThreadInfo: &corex86.ThreadInfoX86{Gpregs: &corex86.UserX86RegsEntry{Sp: proto.Uint64(sp)}}}
	b, err := proto.MarshalOptions{AllowPartial: true}.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	out := binary.LittleEndian.AppendUint32(nil, magicImgCommon)
	out = binary.LittleEndian.AppendUint32(out, magicCore)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(b)))
	return append(out, b...)
}

func TestReadStackPointer(t *testing.T) {
	img := coreImage(t, 0x7ffc0000123f)
	if sp, err := readStackPointer(bytes.NewReader(img)); err != nil || sp != 0x7ffc0000123f {
		t.Fatalf("sp %#x, %v", sp, err)
	}
	noRegs := coreImage(t, 0)[:12]
	noRegs = binary.LittleEndian.AppendUint32(noRegs[:8], 0)
	huge := binary.LittleEndian.AppendUint32(append([]byte(nil), img[:8]...), maxCoreBytes+1)
	for name, in := range map[string][]byte{
		"empty":          nil,
		"cut":            img[:len(img)-1],
		"wrong magic":    append(append([]byte(nil), img[:4]...), append([]byte{1, 2, 3, 4}, img[8:]...)...),
		"huge":           huge,
		"no x86 regs":    noRegs,
		"garbage record": append(append([]byte(nil), img[:8]...), 3, 0, 0, 0, 0xff, 0xff, 0xff),
	} {
		if _, err := readStackPointer(bytes.NewReader(in)); !errors.Is(err, ErrImage) {
			t.Errorf("%s: %v, want ErrImage", name, err)
		}
	}
}

// A zombie's core has no registers: no stack page, not an error.
func TestReadStackPointerZombie(t *testing.T) {
	c := &criucore.CoreEntry{Tc: &criucore.TaskCoreEntry{TaskState: proto.Uint32(taskDead)}}
	b, err := proto.MarshalOptions{AllowPartial: true}.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	img := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, magicImgCommon), magicCore)
	img = append(binary.LittleEndian.AppendUint32(img, uint32(len(b))), b...)
	if sp, err := readStackPointer(bytes.NewReader(img)); err != nil || sp != noStack {
		t.Fatalf("zombie core: sp %#x, %v; want noStack", sp, err)
	}
}

func FuzzReadStackPointer(f *testing.F) {
	f.Add(coreImage(f, 0x7ffc0000123f))
	f.Add([]byte{0x19, 0x43, 0x56, 0x54, 0x47, 0x38, 0x05, 0x55, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		if _, err := readStackPointer(bytes.NewReader(in)); err != nil && !errors.Is(err, ErrImage) {
			t.Fatalf("error %v does not wrap ErrImage", err)
		}
	})
}

// TestEagerRanges: the command line's and environment's pages, rounded
// out to pages, are cut from the VMAs that can be lazy.
func TestEagerRanges(t *testing.T) {
	img := mmImage([]testVMA{anonVMA(0x7000_0000, 0x7000_8000, 3)})
	var mm mmimg.MmEntry
	rec, err := readRecord(bytes.NewReader(img), magicMM, maxMMBytes, "mm")
	if err != nil {
		t.Fatal(err)
	}
	if err := (proto.UnmarshalOptions{AllowPartial: true}).Unmarshal(rec, &mm); err != nil {
		t.Fatal(err)
	}
	mm.MmArgStart, mm.MmArgEnd = proto.Uint64(0x7000_2010), proto.Uint64(0x7000_2100)
	mm.MmEnvStart, mm.MmEnvEnd = proto.Uint64(0x7000_2100), proto.Uint64(0x7000_3001)
	b := appendRecord(binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, magicImgCommon), magicMM), &mm)
	got, err := readEagerRanges(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	want := []vma{{0x7000_2000, 0x7000_3000}, {0x7000_2000, 0x7000_4000}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("eager ranges %v, want %v", got, want)
	}
	cut := cutRanges([]vma{{0x7000_0000, 0x7000_8000}}, got)
	wantCut := []vma{{0x7000_0000, 0x7000_2000}, {0x7000_4000, 0x7000_8000}}
	if len(cut) != 2 || cut[0] != wantCut[0] || cut[1] != wantCut[1] {
		t.Fatalf("cut %v, want %v", cut, wantCut)
	}
	// Empty or unbelievable ranges make nothing eager.
	if got, err := readEagerRanges(bytes.NewReader(mmImage(nil))); err != nil || len(got) != 0 {
		t.Fatalf("zero ranges: %v, %v", got, err)
	}
}

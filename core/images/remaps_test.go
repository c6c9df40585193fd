package images

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/checkpoint-restore/go-criu/v8/crit/images/fdinfo"
	"github.com/checkpoint-restore/go-criu/v8/crit/images/fown"
	regfile "github.com/checkpoint-restore/go-criu/v8/crit/images/regfile"
	remap "github.com/checkpoint-restore/go-criu/v8/crit/images/remap-file-path"
	"google.golang.org/protobuf/proto"
)

// commonImage encodes records as CRIU writes a common image.
func commonImage(t testing.TB, magic uint32, recs ...proto.Message) []byte {
	t.Helper()
	b := binary.LittleEndian.AppendUint32(nil, magicCommon)
	b = binary.LittleEndian.AppendUint32(b, magic)
	for _, m := range recs {
		data, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
		b = append(b, data...)
	}
	return b
}

func regEntry(id uint32, name string, mnt int32) *fdinfo.FileEntry {
	return &fdinfo.FileEntry{Type: fdinfo.FdTypes_REG.Enum(), Id: proto.Uint32(id), Reg: &regfile.RegFileEntry{
		Id: proto.Uint32(id), Flags: proto.Uint32(0), Pos: proto.Uint64(0), Name: proto.String(name), MntId: proto.Int32(mnt),
		Fown: &fown.FownEntry{Uid: proto.Uint32(0), Euid: proto.Uint32(0), Signum: proto.Uint32(0), PidType: proto.Uint32(0), Pid: proto.Uint32(0)}}}
}

func TestReadLinkRemaps(t *testing.T) {
	dir := t.TempDir()
	if r, err := ReadLinkRemaps(dir); err != nil || r != nil {
		t.Fatalf("a dump without remap-fpath.img: %v, %v; want none", r, err)
	}
	write := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	linked, ghost := remap.RemapType_LINKED, remap.RemapType_GHOST
	write(remapFpathImage, commonImage(t, magicRemapFpath,
		&remap.RemapFilePathEntry{OrigId: proto.Uint32(5), RemapId: proto.Uint32(23), RemapType: &linked},
		&remap.RemapFilePathEntry{OrigId: proto.Uint32(6), RemapId: proto.Uint32(24), RemapType: &ghost},
		&remap.RemapFilePathEntry{OrigId: proto.Uint32(7), RemapId: proto.Uint32(25), RemapType: &linked}))
	write(filesImage, commonImage(t, magicFiles, regEntry(5, "/tmp/x/data", -1), regEntry(23, "/tmp/x/link_remap.23", -1),
		regEntry(24, "/tmp/x/ghost", -1), regEntry(25, "srv/link_remap.25", 31)))
	got, err := ReadLinkRemaps(dir)
	want := []LinkRemap{{Path: "/tmp/x/link_remap.23", MntID: -1}, {Path: "srv/link_remap.25", MntID: 31}}
	if err != nil || len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("ReadLinkRemaps = %+v, %v; want %+v", got, err, want)
	}
	// A remap files.img does not name is an error.
	write(filesImage, commonImage(t, magicFiles, regEntry(23, "/tmp/x/link_remap.23", -1)))
	if _, err := ReadLinkRemaps(dir); !errors.Is(err, ErrImage) {
		t.Fatalf("a remap without its file entry: %v, want ErrImage", err)
	}
}

// FuzzRecords: decodeRecords never reads past its bounds and wraps every
// failure in ErrImage.
func FuzzRecords(f *testing.F) {
	linked := remap.RemapType_LINKED
	f.Add(commonImage(f, magicRemapFpath, &remap.RemapFilePathEntry{OrigId: proto.Uint32(1), RemapId: proto.Uint32(2), RemapType: &linked}))
	f.Add([]byte{0x19, 0x43, 0x56, 0x54, 0x54, 0x39, 0x13, 0x59, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		n := 0
		err := decodeRecords(bytes.NewReader(in), magicRemapFpath, func(b []byte) error {
			n++
			if len(b) > maxRecordBytes {
				t.Fatalf("record of %d bytes", len(b))
			}
			var e remap.RemapFilePathEntry
			return proto.Unmarshal(b, &e)
		})
		if err != nil && !errors.Is(err, ErrImage) {
			t.Fatalf("error %v does not wrap ErrImage", err)
		}
	})
}

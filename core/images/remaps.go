package images

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v8/crit/images/fdinfo"
	remap "github.com/checkpoint-restore/go-criu/v8/crit/images/remap-file-path"
	"google.golang.org/protobuf/proto"
)

// LinkRemap is a hard link CRIU's --link-remap made, in the directory of
// an open file whose name was unlinked (link_remap.N), so that a restore
// can open the file by name. A dump that kills its tree leaves it for the
// restore, which removes it; a restore that never happens leaves it for
// good (docs: criu-protocols §5.1).
type LinkRemap struct {
	// Path is the link's name as CRIU recorded it: relative to the root
	// of the mount MntID in the dumped tree's mount namespace.
	Path  string
	MntID int32
}

// Layout of CRIU's common images (criu/image.c): u32 IMG_COMMON, u32 the
// image's magic, then records of a u32 length (host order, little-endian
// here) and that many protobuf bytes.
const (
	magicCommon      = 0x54564319
	magicFiles       = 0x56303138
	magicRemapFpath  = 0x59133954
	maxRecordBytes   = 1 << 20 // a file entry: a path (PATH_MAX) and a little more
	maxImageRecords  = 1 << 20
	remapFpathImage  = "remap-fpath.img"
	filesImage       = "files.img"
	maxLinkRemapPath = 4096
)

// ErrImage reports an image that does not decode.
var ErrImage = errors.New("images: bad image")

// ReadLinkRemaps returns the link remaps of the dump in dir: the LINKED
// entries of remap-fpath.img, named by their files.img entries. A dump
// without remap-fpath.img made none.
func ReadLinkRemaps(dir string) ([]LinkRemap, error) {
	var ids []uint32
	err := readRecords(filepath.Join(dir, remapFpathImage), magicRemapFpath, func(b []byte) error {
		var e remap.RemapFilePathEntry
		if err := proto.Unmarshal(b, &e); err != nil {
			return err
		}
		if e.GetRemapType() == remap.RemapType_LINKED {
			ids = append(ids, e.GetRemapId())
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(ids) == 0) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	want := make(map[uint32]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	var out []LinkRemap
	err = readRecords(filepath.Join(dir, filesImage), magicFiles, func(b []byte) error {
		var e fdinfo.FileEntry
		if err := proto.Unmarshal(b, &e); err != nil {
			return err
		}
		if !want[e.GetId()] || e.GetType() != fdinfo.FdTypes_REG || e.GetReg() == nil {
			return nil
		}
		name := e.GetReg().GetName()
		if name == "" || len(name) > maxLinkRemapPath {
			return fmt.Errorf("link remap %d: name of %d bytes", e.GetId(), len(name))
		}
		delete(want, e.GetId())
		out = append(out, LinkRemap{Path: name, MntID: e.GetReg().GetMntId()})
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(want) > 0 {
		return out, fmt.Errorf("%w: %s names %d link remaps %s does not list", ErrImage, remapFpathImage, len(want), filesImage)
	}
	return out, nil
}

// readRecords calls each with every record of the common image at path.
func readRecords(path string, magic uint32, each func([]byte) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := decodeRecords(f, magic, each); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func decodeRecords(r io.Reader, magic uint32, each func([]byte) error) error {
	var h [8]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return fmt.Errorf("%w: header: %w", ErrImage, err)
	}
	if c, m := binary.LittleEndian.Uint32(h[0:4]), binary.LittleEndian.Uint32(h[4:8]); c != magicCommon || m != magic {
		return fmt.Errorf("%w: magic %#x %#x, want %#x %#x", ErrImage, c, m, uint32(magicCommon), magic)
	}
	for n := 0; ; n++ {
		var l [4]byte
		if _, err := io.ReadFull(r, l[:]); errors.Is(err, io.EOF) {
			return nil
		} else if err != nil {
			return fmt.Errorf("%w: record %d: %w", ErrImage, n, err)
		}
		size := binary.LittleEndian.Uint32(l[:])
		if size > maxRecordBytes || n >= maxImageRecords {
			return fmt.Errorf("%w: record %d of %d bytes", ErrImage, n, size)
		}
		b := make([]byte, size) // bounded above
		if _, err := io.ReadFull(r, b); err != nil {
			return fmt.Errorf("%w: record %d: %w", ErrImage, n, err)
		}
		if err := each(b); err != nil {
			return fmt.Errorf("%w: record %d: %w", ErrImage, n, err)
		}
	}
}

package images

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/checkpoint-restore/go-criu/v8/crit/images/inventory"
	"google.golang.org/protobuf/proto"
)

func inventoryImage(t testing.TB, e *inventory.InventoryEntry) []byte {
	b, err := proto.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	out := binary.LittleEndian.AppendUint32(nil, inventoryMagic)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(b)))
	return append(out, b...)
}

func TestDecodeInventory(t *testing.T) {
	runID := "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
	lock := uint32(1) // nftables, in the image enum
	good := inventoryImage(t, &inventory.InventoryEntry{ImgVersion: proto.Uint32(2), DumpCriuRunId: &runID, NetworkLockMethod: &lock})
	inv, err := decodeInventory(bytes.NewReader(good))
	if err != nil || inv.RunID != runID || inv.NetworkLock != 1 {
		t.Fatalf("decode = %+v, %v", inv, err)
	}
	if got := NftLockTable(runID); got != "CRIU-1b4e28ba-2fa1-11d2-88" {
		t.Errorf("NftLockTable = %q", got)
	}
	huge := binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint32(nil, inventoryMagic), 1<<31)
	for name, in := range map[string][]byte{
		"empty":     nil,
		"bad magic": append([]byte{1, 2, 3, 4}, good[4:]...),
		"huge":      huge,
		"truncated": good[:len(good)-2],
	} {
		if _, err := decodeInventory(bytes.NewReader(in)); !errors.Is(err, ErrInventory) {
			t.Errorf("%s: %v, want ErrInventory", name, err)
		}
	}
}

func FuzzInventory(f *testing.F) {
	runID := "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
	f.Add(inventoryImage(f, &inventory.InventoryEntry{ImgVersion: proto.Uint32(2), DumpCriuRunId: &runID}))
	f.Add([]byte{0x16, 0x31, 0x31, 0x58, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		inv, err := decodeInventory(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrInventory) {
				t.Fatalf("error %v does not wrap ErrInventory", err)
			}
			return
		}
		if len(NftLockTable(inv.RunID)) > 26 {
			t.Fatalf("table name %q too long", NftLockTable(inv.RunID))
		}
	})
}

package images

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/checkpoint-restore/go-criu/v8/crit/images/inventory"
	"google.golang.org/protobuf/proto"
)

// Inventory is what phaul reads of a dump's inventory.img.
type Inventory struct {
	// RunID is the dump's CRIU run id (CRIU 4.1+), "" if the image has
	// none.
	RunID string
	// NetworkLock is the lock method in the image's enum: 0 iptables,
	// 1 nftables, 2 skip.
	NetworkLock uint32
}

// Layout of inventory.img (CRIU's criu/image.c): a u32 magic of its own (no
// common prefix), then one entry, a u32 length in host order (little-endian
// on every architecture phaul runs on) and that many protobuf bytes.
const (
	inventoryMagic = 0x58313116
	// maxInventoryBytes bounds the entry: CRIU's is well under 1 KiB.
	maxInventoryBytes = 64 << 10
)

// ErrInventory reports an inventory.img that does not decode.
var ErrInventory = errors.New("images: bad inventory.img")

// ReadInventory reads dir/inventory.img.
func ReadInventory(dir string) (Inventory, error) {
	f, err := os.Open(filepath.Join(dir, "inventory.img"))
	if err != nil {
		return Inventory{}, fmt.Errorf("read inventory: %w", err)
	}
	defer f.Close()
	inv, err := decodeInventory(f)
	if err != nil {
		return Inventory{}, fmt.Errorf("read inventory in %s: %w", dir, err)
	}
	return inv, nil
}

func decodeInventory(r io.Reader) (Inventory, error) {
	var inv Inventory
	err := decodeInventoryEntry(r, func(e *inventory.InventoryEntry) {
		inv = Inventory{RunID: e.GetDumpCriuRunId(), NetworkLock: uint32(e.GetNetworkLockMethod())}
	})
	return inv, err
}

// readInventory decodes dir/inventory.img and hands its entry to use.
func readInventory(dir string, use func(*inventory.InventoryEntry)) error {
	f, err := os.Open(filepath.Join(dir, "inventory.img"))
	if err != nil {
		return fmt.Errorf("read inventory: %w", err)
	}
	defer f.Close()
	if err := decodeInventoryEntry(f, use); err != nil {
		return fmt.Errorf("read inventory in %s: %w", dir, err)
	}
	return nil
}

func decodeInventoryEntry(r io.Reader, use func(*inventory.InventoryEntry)) error {
	var h [8]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return fmt.Errorf("%w: header: %w", ErrInventory, err)
	}
	if m := binary.LittleEndian.Uint32(h[0:4]); m != inventoryMagic {
		return fmt.Errorf("%w: magic %#x", ErrInventory, m)
	}
	n := binary.LittleEndian.Uint32(h[4:8])
	if n > maxInventoryBytes {
		return fmt.Errorf("%w: entry of %d bytes", ErrInventory, n)
	}
	b := make([]byte, n) // n is bounded above
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("%w: entry: %w", ErrInventory, err)
	}
	var e inventory.InventoryEntry
	if err := proto.Unmarshal(b, &e); err != nil {
		return fmt.Errorf("%w: %w", ErrInventory, err)
	}
	use(&e)
	return nil
}

// NftLockTable returns the name of the nftables table CRIU 4.1+ creates
// for a dump with this run id (in family inet): "CRIU-" and the run id cut
// to what fits CRIU's 32-byte buffer for "inet CRIU-<id>" (21 characters).
func NftLockTable(runID string) string {
	const maxName = 32 - 1 - len("inet CRIU-")
	if len(runID) > maxName {
		runID = runID[:maxName]
	}
	return "CRIU-" + runID
}

package linux

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func TestTmpfile(t *testing.T) {
	dir := t.TempDir()
	f, err := OpenTmpfile(dir)
	if errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("SKIP: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("a tmpfile shows in its dir: %v", ents)
	}
	want := []byte("pages")
	if _, err := f.WriteAt(want, 8192); err != nil {
		t.Fatal(err)
	}
	if err := StartWriteback(f, 0, 0); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "pages-1.img")
	if err := LinkTmpfile(f, path); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 8192+len(want) || string(got[8192:]) != string(want) {
		t.Fatalf("linked file holds %d bytes ending %q", len(got), got[len(got)-len(want):])
	}
	if err := LinkTmpfile(f, path); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("link over an existing name: %v, want ErrExist", err)
	}
}

func TestDiskUsageAndFree(t *testing.T) {
	dir := t.TempDir()
	empty, err := DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir+"/a", make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(dir+"/sub", 0o700)
	if err := os.WriteFile(dir+"/sub/b", []byte{1}, 0o600); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(dir+"/sparse", nil, 0o600)
	os.Truncate(dir+"/sparse", 1<<30) // a hole occupies nothing
	got, err := DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got-empty < 1<<20 || got-empty > 1<<20+64<<10 {
		t.Fatalf("DiskUsage after 1 MiB and 1 byte (and a 1 GiB hole) grew by %d bytes", got-empty)
	}
	free, err := DiskFree(dir)
	if err != nil || free == 0 {
		t.Fatalf("DiskFree = %d, %v", free, err)
	}
	if _, err := DiskFree(dir + "/none"); err == nil {
		t.Fatal("DiskFree of a missing path succeeded")
	}
}

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

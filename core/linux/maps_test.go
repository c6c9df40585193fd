package linux

import (
	"os"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestParseMaps(t *testing.T) {
	in := `55d0c0a00000-55d0c0a02000 r--p 00000000 08:01 1835 /usr/bin/my prog
7ffc1c3f0000-7ffc1c411000 rw-p 00000000 00:00 0                          [stack]
7ffc1c5e4000-7ffc1c5e8000 r--p 00000000 00:00 0                          [vvar]
7f0000000000-7f0000100000 rw-s 00000000 00:01 4242                       /dev/zero (deleted)
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
`
	ms, err := ParseMaps(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []Mapping{
		{0x55d0c0a00000, 0x55d0c0a02000, "r--p", 0, 1835, "/usr/bin/my prog"},
		{0x7ffc1c3f0000, 0x7ffc1c411000, "rw-p", 0, 0, "[stack]"},
		{0x7ffc1c5e4000, 0x7ffc1c5e8000, "r--p", 0, 0, "[vvar]"},
		{0x7f0000000000, 0x7f0000100000, "rw-s", 0, 4242, "/dev/zero (deleted)"},
		{0x7f0000200000, 0x7f0000300000, "rw-p", 0, 0, ""},
	}
	if len(ms) != len(want) {
		t.Fatalf("%d mappings, want %d", len(ms), len(want))
	}
	for i := range want {
		if ms[i] != want[i] {
			t.Errorf("mapping %d: %+v, want %+v", i, ms[i], want[i])
		}
	}
	if !ms[1].Private() || ms[1].Special() || !ms[2].Special() || ms[3].Private() {
		t.Errorf("Private/Special wrong: %+v", ms)
	}
	for _, bad := range []string{"zz-1 rw-p 0 0:0 0\n", "1000-0 rw-p 0 0:0 0\n", "1000-2000 rw 0 0:0 0\n", "1000-2000 rw-p\n"} {
		if _, err := ParseMaps(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseMaps(%q) accepted", bad)
		}
	}
}

func TestReadProcessMemory(t *testing.T) {
	src := []byte("phaul reads this")
	buf := make([]byte, len(src))
	n, err := ReadProcessMemory(os.Getpid(), uint64(uintptr(unsafe.Pointer(&src[0]))), buf)
	if err != nil || n != len(src) || string(buf) != string(src) {
		t.Fatalf("ReadProcessMemory = %d, %v, %q", n, err, buf)
	}
	ms, err := ReadMaps(os.Getpid())
	if err != nil || len(ms) == 0 {
		t.Fatalf("ReadMaps(self) = %d mappings, %v", len(ms), err)
	}
}

// TestReadProcessMemoryProtNone: a page without read permission still
// reads (as CRIU dumps it), through /proc/PID/mem.
func TestReadProcessMemoryProtNone(t *testing.T) {
	b, err := unix.Mmap(-1, 0, 2*os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	copy(b, "readable")
	copy(b[os.Getpagesize():], "hidden")
	if err := unix.Mprotect(b[os.Getpagesize():], unix.PROT_NONE); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(b))
	n, err := ReadProcessMemory(os.Getpid(), uint64(uintptr(unsafe.Pointer(&b[0]))), buf)
	if err != nil || n != len(b) || string(buf[:8]) != "readable" || string(buf[os.Getpagesize():os.Getpagesize()+6]) != "hidden" {
		t.Fatalf("ReadProcessMemory over a PROT_NONE page = %d, %v, %q / %q", n, err, buf[:8], buf[os.Getpagesize():os.Getpagesize()+6])
	}
}

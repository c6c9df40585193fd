package linux

import (
	"os"
	"slices"
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
		{0x55d0c0a00000, 0x55d0c0a02000, "r--p", 0, 1835, "/usr/bin/my prog", ""},
		{0x7ffc1c3f0000, 0x7ffc1c411000, "rw-p", 0, 0, "[stack]", ""},
		{0x7ffc1c5e4000, 0x7ffc1c5e8000, "r--p", 0, 0, "[vvar]", ""},
		{0x7f0000000000, 0x7f0000100000, "rw-s", 0, 4242, "/dev/zero (deleted)", ""},
		{0x7f0000200000, 0x7f0000300000, "rw-p", 0, 0, "", ""},
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

func TestParseSmaps(t *testing.T) {
	in := `7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me ac dp 
7f0000400000-7f0000401000 rw-p 00000000 00:00 0                          [anon:glibc: malloc]
Size:                  4 kB
THPeligible:           0
VmFlags: rd wr mr mw me ac 
`
	ms, err := ParseSmaps(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []Mapping{
		{0x7f0000200000, 0x7f0000300000, "rw-p", 0, 0, "", "rd wr mr mw me ac dp"},
		{0x7f0000400000, 0x7f0000401000, "rw-p", 0, 0, "[anon:glibc: malloc]", "rd wr mr mw me ac"},
	}
	if len(ms) != len(want) || ms[0] != want[0] || ms[1] != want[1] {
		t.Fatalf("ParseSmaps = %+v, want %+v", ms, want)
	}
	if !ms[0].Droppable() || ms[1].Droppable() || ms[1].Special() || !ms[1].HasVMFlag("ac") {
		t.Errorf("Droppable/Special/HasVMFlag wrong: %+v", ms)
	}
	for _, bad := range []string{"Size: 4 kB\n", "7f0000200000-7f0000300000 rw-p\nVmFlags: rd\n"} {
		if _, err := ParseSmaps(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseSmaps(%q) accepted", bad)
		}
	}
}

// TestSpecial: the kernel's mappings CRIU names, and no others.
func TestSpecial(t *testing.T) {
	for path, want := range map[string]bool{
		"[vdso]": true, "[vvar]": true, "[vvar_vclock]": true, "[vsyscall]": true, "[vectors]": true, "[uprobes]": true,
		"[heap]": false, "[stack]": false, "[anon:zoo]": false, "": false, "/usr/lib/libc.so.6": false,
	} {
		if got := (Mapping{Path: path}).Special(); got != want {
			t.Errorf("Special(%q) = %v, want %v", path, got, want)
		}
	}
}

func TestHaveDroppable(t *testing.T) {
	checkConclusive(t, "MAP_DROPPABLE", HaveDroppable(), olderThan(t, 6, 11))
}

// TestReadSmapsDroppable: smaps tells a MAP_DROPPABLE mapping from a
// private one; maps cannot.
func TestReadSmapsDroppable(t *testing.T) {
	requireFeature(t, HaveDroppable)
	page := os.Getpagesize()
	drop, err := unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_DROPPABLE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(drop)
	priv, err := mapAnon(1)
	if err != nil {
		t.Fatal(err)
	}
	defer priv.unmap()
	ms, err := ReadSmaps(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	dropAddr := uint64(uintptr(unsafe.Pointer(&drop[0])))
	for _, tc := range []struct {
		addr uint64
		want bool
	}{{dropAddr, true}, {priv.addr, false}} {
		i := slices.IndexFunc(ms, func(m Mapping) bool { return m.Start <= tc.addr && tc.addr < m.End })
		if i < 0 {
			t.Fatalf("%#x not in smaps", tc.addr)
		}
		if m := ms[i]; m.Droppable() != tc.want || !m.Private() || m.VMFlags == "" {
			t.Errorf("mapping at %#x: %+v, want droppable %v", tc.addr, m, tc.want)
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

// FuzzParseSmaps: whatever it accepts are well-formed mappings, the same
// ParseMaps finds in the input without its "Key: value" lines.
func FuzzParseSmaps(f *testing.F) {
	f.Add("7f0000200000-7f0000300000 rw-p 00000000 00:00 0\nSize: 1024 kB\nVmFlags: rd wr dp \n")
	f.Add("1000-2000 r--p 0 00:00 0 [anon:a b]\nVmFlags:\n3000-4000 rw-s 10 08:01 7 /x\n")
	f.Add("VmFlags: rd\n")
	f.Fuzz(func(t *testing.T, in string) {
		ms, err := ParseSmaps(strings.NewReader(in))
		if err != nil {
			return
		}
		var headers []string
		for _, line := range strings.Split(in, "\n") {
			if key, _, _ := strings.Cut(line, " "); line != "" && !strings.HasSuffix(key, ":") {
				headers = append(headers, line)
			}
		}
		plain, err := ParseMaps(strings.NewReader(strings.Join(headers, "\n")))
		if err != nil || len(plain) != len(ms) {
			t.Fatalf("ParseMaps of the headers: %d mappings, %v; ParseSmaps: %d", len(plain), err, len(ms))
		}
		for i, m := range ms {
			if m.End <= m.Start || len(m.Perms) != 4 {
				t.Fatalf("mapping %d malformed: %+v", i, m)
			}
			if m.VMFlags = ""; m != plain[i] {
				t.Fatalf("mapping %d: %+v, ParseMaps %+v", i, m, plain[i])
			}
		}
	})
}

// TestWriteProcessMemory writes a read-only page and a page never touched.
func TestWriteProcessMemory(t *testing.T) {
	b, err := unix.Mmap(-1, 0, 2*os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	copy(b, "before")
	if err := unix.Mprotect(b[:os.Getpagesize()], unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	base := uint64(uintptr(unsafe.Pointer(&b[0])))
	if err := WriteProcessMemory(os.Getpid(), base, []byte("after!")); err != nil {
		t.Fatal(err)
	}
	if err := WriteProcessMemory(os.Getpid(), base+uint64(os.Getpagesize()), []byte("fresh")); err != nil {
		t.Fatal(err)
	}
	if string(b[:6]) != "after!" || string(b[os.Getpagesize():os.Getpagesize()+5]) != "fresh" {
		t.Fatalf("after WriteProcessMemory: %q / %q", b[:6], b[os.Getpagesize():os.Getpagesize()+5])
	}
	if err := WriteProcessMemory(os.Getpid(), 0, []byte("x")); err == nil {
		t.Fatal("a write at address 0 succeeded")
	}
}

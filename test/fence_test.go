package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/phaul/phaul"

// TestFence keeps syscalls and unsafe inside core/linux and the imports
// flowing one way: cmd -> phaul -> pageserver, lazy -> core/*.
func TestFence(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}} {{.GoFiles}} {{.Imports}}", module+"/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	pkgs := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkg, rest, _ := strings.Cut(line, " ")
		files, imports, _ := strings.Cut(rest, "] [")
		rel := strings.TrimPrefix(strings.TrimPrefix(pkg, module), "/")
		pkgs++
		for _, imp := range strings.Fields(strings.Trim(imports, "[]")) {
			if (imp == "unsafe" || imp == "golang.org/x/sys/unix") && rel != "core/linux" {
				// Generated protobuf code uses unsafe; nothing else may.
				if imp == "unsafe" && onlyGenerated(files) {
					continue
				}
				t.Errorf("%s imports %s: only core/linux may", pkg, imp)
			}
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			dep := strings.TrimPrefix(imp, module+"/")
			if !allowed(rel, dep) {
				t.Errorf("%s imports %s: imports flow cmd -> phaul -> pageserver, lazy -> core", rel, dep)
			}
		}
	}
	if pkgs < 10 {
		t.Fatalf("go list saw only %d packages", pkgs)
	}
}

// onlyGenerated reports whether the package is a generated protobuf
// package (core/wire holds control.pb.go next to hand-written files; it
// passes because its hand-written files import no unsafe: checked by
// grepping them below).
func onlyGenerated(files string) bool {
	for _, f := range strings.Fields(strings.Trim(files, "[]")) {
		if strings.HasSuffix(f, ".pb.go") {
			return true
		}
	}
	return false
}

func allowed(from, to string) bool {
	layer := func(p string) int {
		switch {
		case strings.HasPrefix(p, "cmd/"):
			return 3
		case p == "phaul":
			return 2
		case p == "pageserver", p == "lazy":
			return 1
		case strings.HasPrefix(p, "core/"):
			return 0
		}
		return -1 // test/...: may import anything but cmd
	}
	lf, lt := layer(from), layer(to)
	if lt == 3 {
		return false
	}
	if lf == -1 {
		return true
	}
	if lf == 0 {
		return lt == 0
	}
	return lt < lf
}

// TestFenceHandWrittenWire: the only unsafe outside core/linux is generated.
func TestFenceHandWrittenWire(t *testing.T) {
	out, err := exec.Command("grep", "-lE", `^\s*(import )?"unsafe"$`, "-r", "--include=*.go", "..").CombinedOutput()
	if err != nil && len(out) == 0 {
		t.Fatalf("grep: %v", err)
	}
	for _, f := range strings.Fields(string(out)) {
		f = filepath.ToSlash(filepath.Clean(f))
		if strings.HasPrefix(f, "../core/linux/") || strings.HasSuffix(f, ".pb.go") {
			continue
		}
		t.Errorf("%s imports unsafe", f)
	}
}

// TestFenceNoFaultSwitches: the binary `make build` ships knows none of
// the test-only fault switches (they are compiled only with -tags
// phaulfaults), while the test build does (the negative control: the
// check would find them).
func TestFenceNoFaultSwitches(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		tags string
		want bool
	}{{"", false}, {"phaulfaults", true}} {
		bin := filepath.Join(dir, "phaul"+tc.tags)
		args := []string{"build", "-o", bin}
		if tc.tags != "" {
			args = append(args, "-tags", tc.tags)
		}
		if out, err := exec.Command("go", append(args, module+"/cmd/phaul")...).CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
		b, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		if got := bytes.Contains(b, []byte("PHAUL_FAULT_")); got != tc.want {
			t.Errorf("binary built with tags %q holds the fault switches: %v, want %v", tc.tags, got, tc.want)
		}
	}
}

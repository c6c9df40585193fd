package pki

import (
	"crypto/x509"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestCreateLoadCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := CreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	assertFiles(t, dir, map[string]fs.FileMode{CACertFile: certPerm, CAKeyFile: keyPerm})
	if !ca.Cert.IsCA || ca.Cert.SerialNumber.BitLen() != 128 {
		t.Errorf("CA cert: IsCA=%v serial bits=%d", ca.Cert.IsCA, ca.Cert.SerialNumber.BitLen())
	}
	if got := ca.Cert.NotAfter.Sub(ca.Cert.NotBefore); got < CAValidity || got > CAValidity+time.Hour {
		t.Errorf("CA validity %v, want about %v", got, CAValidity)
	}
	loaded, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Cert.Equal(ca.Cert) {
		t.Error("LoadCA returned a different certificate")
	}
}

func TestLoadOrCreateCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, created, err := LoadOrCreateCA(dir)
	if err != nil || !created {
		t.Fatalf("first LoadOrCreateCA = %v, %v", created, err)
	}
	ca2, created, err := LoadOrCreateCA(dir)
	if err != nil || created || !ca2.Cert.Equal(ca.Cert) {
		t.Fatalf("second LoadOrCreateCA = %v, %v; want the same CA, loaded", created, err)
	}
	removeFile(t, dir, CAKeyFile)
	if _, _, err := LoadOrCreateCA(dir); !errors.Is(err, ErrCAExists) {
		t.Fatalf("LoadOrCreateCA with only ca.crt = %v, want ErrCAExists", err)
	}
}

func TestCreateCARefusesExisting(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir string)
	}{
		{"full CA", func(t *testing.T, dir string) { mustCreateCA(t, dir) }},
		{"cert only", func(t *testing.T, dir string) { writeTestFile(t, dir, CACertFile, "x") }},
		{"key only", func(t *testing.T, dir string) { writeTestFile(t, dir, CAKeyFile, "x") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.prepare(t, dir)
			before := readDir(t, dir)
			if _, err := CreateCA(dir); !errors.Is(err, ErrCAExists) {
				t.Fatalf("CreateCA = %v, want ErrCAExists", err)
			}
			if after := readDir(t, dir); !maps.Equal(before, after) {
				t.Errorf("CreateCA changed the directory: %v -> %v", before, after)
			}
		})
	}
}

func TestLoadCAErrors(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		want    error
	}{
		{"empty dir", func(t *testing.T, dir string) {}, fs.ErrNotExist},
		{"no key", func(t *testing.T, dir string) {
			mustCreateCA(t, dir)
			removeFile(t, dir, CAKeyFile)
		}, fs.ErrNotExist},
		{"foreign key", func(t *testing.T, dir string) {
			mustCreateCA(t, dir)
			other := t.TempDir()
			mustCreateCA(t, other)
			copyFile(t, other, dir, CAKeyFile)
		}, ErrNotCA},
		{"node cert as CA", func(t *testing.T, dir string) {
			node := t.TempDir()
			mustIssue(t, mustCreateCA(t, t.TempDir()), []string{"a"}, node)
			copyFile(t, node, dir, NodeCertFile)
			copyFile(t, node, dir, NodeKeyFile)
			must(t, os.Rename(filepath.Join(dir, NodeCertFile), filepath.Join(dir, CACertFile)))
			must(t, os.Rename(filepath.Join(dir, NodeKeyFile), filepath.Join(dir, CAKeyFile)))
		}, ErrNotCA},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.prepare(t, dir)
			if _, err := LoadCA(dir); !errors.Is(err, tt.want) {
				t.Fatalf("LoadCA = %v, want %v", err, tt.want)
			}
		})
	}
	t.Run("garbage PEM", func(t *testing.T) {
		dir := t.TempDir()
		writeTestFile(t, dir, CACertFile, "garbage")
		writeTestFile(t, dir, CAKeyFile, "garbage")
		if _, err := LoadCA(dir); err == nil {
			t.Fatal("LoadCA accepted garbage")
		}
	})
}

func TestIssueNode(t *testing.T) {
	ca := mustCreateCA(t, t.TempDir())
	out := filepath.Join(t.TempDir(), "node")
	cert, err := IssueNode(ca, []string{"node-a.example", "10.0.0.1", "::1", "node-a.example."}, out)
	if err != nil {
		t.Fatal(err)
	}
	assertFiles(t, out, map[string]fs.FileMode{CACertFile: certPerm, NodeCertFile: certPerm, NodeKeyFile: keyPerm})
	if !slices.Equal(cert.DNSNames, []string{"node-a.example"}) || len(cert.IPAddresses) != 2 {
		t.Errorf("SANs: DNS %v IP %v", cert.DNSNames, cert.IPAddresses)
	}
	if len(cert.IPAddresses[0]) != 4 {
		t.Errorf("IPv4 SAN stored as %d bytes, want 4", len(cert.IPAddresses[0]))
	}
	if cert.Subject.CommonName != "node-a.example" || cert.IsCA || cert.SerialNumber.BitLen() != 128 {
		t.Errorf("cert: CN %q IsCA %v serial bits %d", cert.Subject.CommonName, cert.IsCA, cert.SerialNumber.BitLen())
	}
	if got := cert.NotAfter.Sub(cert.NotBefore); got < NodeValidity || got > NodeValidity+time.Hour {
		t.Errorf("node validity %v, want about %v", got, NodeValidity)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		for _, host := range []string{"node-a.example", "10.0.0.1", "::1"} {
			opts := x509.VerifyOptions{Roots: roots, DNSName: host, KeyUsages: []x509.ExtKeyUsage{usage}}
			if _, err := cert.Verify(opts); err != nil {
				t.Errorf("verify usage %v host %s: %v", usage, host, err)
			}
		}
	}
	if err := cert.VerifyHostname("node-b.example"); err == nil {
		t.Error("cert verifies for a host it was not issued for")
	}

	// Reissue replaces the files and gives a new key and serial.
	cert2, err := IssueNode(ca, []string{"node-a.example"}, out)
	if err != nil {
		t.Fatal(err)
	}
	if cert2.SerialNumber.Cmp(cert.SerialNumber) == 0 {
		t.Error("reissue reused the serial number")
	}
	assertFiles(t, out, map[string]fs.FileMode{CACertFile: certPerm, NodeCertFile: certPerm, NodeKeyFile: keyPerm})
}

func TestIssueNodeErrors(t *testing.T) {
	ca := mustCreateCA(t, t.TempDir())
	tests := []struct {
		name  string
		hosts []string
		ca    bool // out holds ca.key
		want  error
	}{
		{"no hosts", nil, false, ErrNoHosts},
		{"host with port", []string{"a.example:7000"}, false, ErrBadHost},
		{"IP with port", []string{"10.0.0.1:7000"}, false, ErrBadHost},
		{"IP with zone", []string{"fe80::1%eth0"}, false, ErrBadHost},
		{"empty label", []string{"a..example"}, false, ErrBadHost},
		{"leading hyphen", []string{"-a.example"}, false, ErrBadHost},
		{"wildcard", []string{"*.example"}, false, ErrBadHost},
		{"empty", []string{""}, false, ErrBadHost},
		{"CA dir", []string{"a.example"}, true, ErrCAKeyPresent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := t.TempDir()
			if tt.ca {
				writeTestFile(t, out, CAKeyFile, "secret")
			}
			if _, err := IssueNode(ca, tt.hosts, out); !errors.Is(err, tt.want) {
				t.Fatalf("IssueNode = %v, want %v", err, tt.want)
			}
			for name := range readDir(t, out) {
				if name != CAKeyFile {
					t.Errorf("IssueNode left %s after failing", name)
				}
			}
		})
	}
}

func TestWriteFileNoReplace(t *testing.T) {
	dir := t.TempDir()
	must(t, writeFile(dir, "f", []byte("one"), keyPerm, false))
	if err := writeFile(dir, "f", []byte("two"), keyPerm, false); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second write = %v, want fs.ErrExist", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "f")); string(got) != "one" {
		t.Errorf("file holds %q, want %q", got, "one")
	}
	assertFiles(t, dir, map[string]fs.FileMode{"f": keyPerm})
}

// assertFiles checks that dir holds exactly the files in want, with their
// modes; in particular no temporary files.
func assertFiles(t *testing.T, dir string, want map[string]fs.FileMode) {
	t.Helper()
	got := readDir(t, dir)
	if !maps.Equal(got, want) {
		t.Errorf("%s holds %v, want %v", dir, got, want)
	}
}

func readDir(t *testing.T, dir string) map[string]fs.FileMode {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]fs.FileMode, len(entries))
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		m[e.Name()] = info.Mode().Perm()
	}
	return m
}

func mustCreateCA(t *testing.T, dir string) *CA {
	t.Helper()
	ca, err := CreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func mustIssue(t *testing.T, ca *CA, hosts []string, out string) {
	t.Helper()
	if _, err := IssueNode(ca, hosts, out); err != nil {
		t.Fatal(err)
	}
}

func writeTestFile(t *testing.T, dir, name, data string) {
	t.Helper()
	must(t, os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600))
}

func removeFile(t *testing.T, dir, name string) {
	t.Helper()
	must(t, os.Remove(filepath.Join(dir, name)))
}

func copyFile(t *testing.T, from, to, name string) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(from, name))
	must(t, err)
	must(t, os.WriteFile(filepath.Join(to, name), data, 0o600))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

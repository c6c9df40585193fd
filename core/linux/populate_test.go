package linux

import "testing"

func TestPopulateCost(t *testing.T) {
	tests := []struct {
		size int
		ok   bool
	}{
		{8 << 20, true},
		{0, false},
		{4097, false},
	}
	for _, tt := range tests {
		d, err := PopulateCost(tt.size)
		if (err == nil) != tt.ok {
			t.Fatalf("PopulateCost(%d) = %v, %v; want ok %v", tt.size, d, err, tt.ok)
		}
		if tt.ok && d <= 0 {
			t.Fatalf("PopulateCost(%d) = %v, want a positive duration", tt.size, d)
		}
	}
}

func TestParseMemAvailable(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"MemTotal:       24591664 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n", 20000000 << 10, true},
		{"MemTotal:       24591664 kB\n", 0, false},
		{"MemAvailable:   x kB\n", 0, false},
		{"MemAvailable:   99999999999999999 kB\n", 0, false},
	}
	for _, tt := range tests {
		got, err := parseMemAvailable(tt.in)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("parseMemAvailable(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	if n, err := MemAvailable(); err != nil || n == 0 {
		t.Fatalf("MemAvailable() = %d, %v", n, err)
	}
}

func TestPrefaultReserve(t *testing.T) {
	r, d, err := Prefault(4 << 20)
	if err != nil || d <= 0 || r.Size() != 4<<20 {
		t.Fatalf("Prefault = %v, %v, %v", r.Size(), d, err)
	}
	r.Release()
	r.Release()
	if r.Size() != 0 {
		t.Fatalf("released reserve of %d bytes", r.Size())
	}
	var none *Reserve
	none.Release()
	if _, _, err := Prefault(100); err == nil {
		t.Fatal("Prefault of 100 bytes succeeded")
	}
}

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

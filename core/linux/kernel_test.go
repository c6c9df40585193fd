package linux

import "testing"

func TestParseKernelVersion(t *testing.T) {
	tests := []struct {
		in      string
		want    KernelVersion
		wantErr bool
	}{
		{"6.18.44-fc-v782", KernelVersion{6, 18, 44}, false},
		{"6.8.0-45-generic", KernelVersion{6, 8, 0}, false},
		{"6.7", KernelVersion{6, 7, 0}, false},
		{"6.10.0-rc3+", KernelVersion{6, 10, 0}, false},
		{"5.15.0.", KernelVersion{5, 15, 0}, false},
		{"4.19.0-26-amd64", KernelVersion{4, 19, 0}, false},
		{"6", KernelVersion{}, true},
		{"", KernelVersion{}, true},
		{"linux", KernelVersion{}, true},
		{"1.2.3.4", KernelVersion{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParseKernelVersion(tt.in)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Fatalf("ParseKernelVersion(%q) = %v, %v; want %v, err %v", tt.in, got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestKernelVersionAtLeast(t *testing.T) {
	v := KernelVersion{6, 7, 3}
	tests := []struct {
		major, minor int
		want         bool
	}{
		{6, 7, true}, {6, 6, true}, {5, 19, true}, {6, 8, false}, {7, 0, false},
	}
	for _, tt := range tests {
		if got := v.AtLeast(tt.major, tt.minor); got != tt.want {
			t.Errorf("%v.AtLeast(%d, %d) = %v", v, tt.major, tt.minor, got)
		}
	}
}

func TestRunningKernel(t *testing.T) {
	v, err := RunningKernel()
	if err != nil {
		t.Fatal(err)
	}
	if !v.AtLeast(3, 0) {
		t.Errorf("running kernel parsed as %v", v)
	}
	if h, err := Hostname(); err != nil || h == "" {
		t.Errorf("Hostname() = %q, %v", h, err)
	}
}

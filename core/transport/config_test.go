package transport

import (
	"strings"
	"testing"
	"time"
)

func TestConfigValidate(t *testing.T) {
	id := &Identity{}
	tests := []struct {
		name  string
		edit  func(c *Config)
		wants []string // substrings of the error; none: valid
	}{
		{"default with identity", func(c *Config) { c.Identity = id }, nil},
		{"default without identity", func(c *Config) {}, []string{"identity"}},
		{"zero", func(c *Config) { *c = Config{} }, []string{
			"identity", "handshake timeout", "RTT", "keep-alive", "write timeout",
			"stream close timeout", "bandwidth", "max handshakes",
		}},
		{"negative bandwidth", func(c *Config) { c.Identity = id; c.Bandwidth = -1 }, []string{"bandwidth"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.edit(&c)
			err := c.Validate()
			if (err == nil) != (len(tt.wants) == 0) {
				t.Fatalf("Validate = %v, want errors about %v", err, tt.wants)
			}
			for _, w := range tt.wants {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate = %v, missing %q", err, w)
				}
			}
		})
	}
}

func TestConfigSizes(t *testing.T) {
	tests := []struct {
		name       string
		bandwidth  int64
		rtt        time.Duration
		window     uint32
		frameBytes int
	}{
		{"default", 1 << 30, time.Millisecond, 1073741, maxFrameBytes},
		{"200 Mbit/s LAN", 25e6, time.Millisecond, minWindowBytes, minFrameBytes},
		{"100 Mbit/s x 50ms", 12.5e6, 50 * time.Millisecond, 625000, minFrameBytes},
		{"10 Gbit/s x 100ms", 1.25e9, 100 * time.Millisecond, maxWindowBytes, maxFrameBytes},
		{"huge", 1 << 62, time.Hour, maxWindowBytes, maxFrameBytes},
		{"64 MB/s", 64e6, time.Millisecond, minWindowBytes, 32000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := Config{Bandwidth: tt.bandwidth, RTT: tt.rtt}
			if got := c.windowBytes(); got != tt.window {
				t.Errorf("windowBytes = %d, want %d", got, tt.window)
			}
			if got := c.frameBytes(); got != tt.frameBytes {
				t.Errorf("frameBytes = %d, want %d", got, tt.frameBytes)
			}
			if got := c.yamuxConfig(c.logger()).MaxStreamWindowSize; got != tt.window {
				t.Errorf("yamux window = %d, want %d", got, tt.window)
			}
		})
	}
}

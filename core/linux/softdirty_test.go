package linux

import "testing"

// TestHaveSoftDirty compares the probe with the kernel's build config. On
// the project VM CONFIG_MEM_SOFT_DIRTY is off, which must come back as
// ErrNotSupported with a reason, not as a probe failure.
func TestHaveSoftDirty(t *testing.T) {
	cfg := kernelConfig(t)
	want := cfg["CONFIG_MEM_SOFT_DIRTY"] == "y"
	err := HaveSoftDirty()
	checkProbe(t, "soft-dirty", err, want)
	if err != nil && err.Error() == "" {
		t.Error("empty reason")
	}
	if err2 := HaveSoftDirty(); err2 != err {
		t.Errorf("second call %v is not the cached answer %v", err2, err)
	}
}

package linux

import "testing"

// TestHaveSoftDirty: the probe answers conclusively, and says no where the
// kernel is built without CONFIG_MEM_SOFT_DIRTY (the project VM), with a
// reason, not as a probe failure. Built in proves nothing: some
// architectures and configurations still lack the bit.
func TestHaveSoftDirty(t *testing.T) {
	err := HaveSoftDirty()
	checkConclusive(t, "soft-dirty", err, notBuilt(t, "CONFIG_MEM_SOFT_DIRTY"))
	if err2 := HaveSoftDirty(); err2 != err {
		t.Errorf("second call %v is not the cached answer %v", err2, err)
	}
}

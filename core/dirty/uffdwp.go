package dirty

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/phaul/phaul/core/linux"
)

// uffdWP is the uffd-wp tracker of one process.
type uffdWP struct {
	pid  int
	uffd *linux.Uffd
	pm   *linux.Pagemap
	regs []Range // registered and protected mappings, sorted
	vec  []linux.PageRegion
}

func startUffdWP(pid int) (_ *uffdWP, err error) {
	f, err := injectUffd(pid)
	if err != nil {
		return nil, err
	}
	t := &uffdWP{pid: pid, uffd: linux.NewUffd(f), vec: make([]linux.PageRegion, 1024)}
	defer func() {
		if err != nil {
			t.Stop()
		}
	}()
	if _, err := t.uffd.API(linux.UffdFeatureWPAsync); err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindUffdWP, pid, err)
	}
	if t.pm, err = linux.OpenPagemap(pid); err != nil {
		return nil, fmt.Errorf("%s %d: %w", KindUffdWP, pid, err)
	}
	rs, err := Mappings(pid)
	if err != nil {
		return nil, err
	}
	for _, r := range rs {
		if err := t.arm(r); err == nil {
			t.regs = append(t.regs, r)
		}
		// else: not covered, so every Collect reports it whole.
	}
	return t, nil
}

// injectUffd makes process pid create a userfaultfd, takes a copy of it
// and closes the process's own.
func injectUffd(pid int) (*os.File, error) {
	tid, err := linux.InjectThread(pid)
	if err != nil {
		return nil, fmt.Errorf("%w: %s %d: %w", ErrUnavailable, KindUffdWP, pid, err)
	}
	fd, err := linux.InjectSyscall(tid, linux.SysUserfaultfd, linux.UffdInjectFlags)
	if err != nil {
		return nil, fmt.Errorf("%s %d: inject userfaultfd: %w", KindUffdWP, pid, err)
	}
	if fd < 0 {
		return nil, fmt.Errorf("%w: %s %d: injected userfaultfd: %w", ErrUnavailable, KindUffdWP, pid, syscall.Errno(-fd))
	}
	pidfd, err := linux.PidfdOpen(pid)
	var f *os.File
	if err == nil {
		f, err = pidfd.Getfd(int(fd))
		pidfd.Close()
	}
	// The process's copy goes at once, whatever happened: a task holding a
	// userfaultfd cannot be dumped, and the application must not see it.
	rc, cerr := linux.InjectSyscall(tid, linux.SysClose, uint64(fd))
	if cerr == nil && rc != 0 {
		cerr = fmt.Errorf("injected close: %w", syscall.Errno(-rc))
	}
	if err = errors.Join(err, cerr); err != nil {
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("%s %d: take the userfaultfd: %w", KindUffdWP, pid, err)
	}
	return f, nil
}

func (t *uffdWP) Kind() string { return KindUffdWP }

// arm registers r for async write-protection and protects it all.
func (t *uffdWP) arm(r Range) error {
	ur := linux.UffdRange{Start: r.Start, Len: r.End - r.Start}
	if err := t.uffd.Register(ur, linux.UffdRegisterWP); err != nil {
		return err
	}
	return t.uffd.WriteProtect(ur, true)
}

// Collect scans every tracked mapping on its own: a mapping it knows is
// scanned and re-armed with PAGEMAP_SCAN; a new one, a moved or grown one,
// and one whose scan fails with EPERM (its registration was lost, e.g. the
// address range was unmapped and mapped again) is reported whole, then
// registered and protected.
func (t *uffdWP) Collect() ([]Range, error) {
	if t.uffd == nil {
		return nil, fmt.Errorf("%s %d: stopped", KindUffdWP, t.pid)
	}
	rs, err := Mappings(t.pid)
	if err != nil {
		return nil, err
	}
	var out, regs []Range
	for _, r := range rs {
		if covered(t.regs, r) {
			n := len(out)
			out, err = t.scan(r, out)
			if err == nil {
				regs = append(regs, r)
				continue
			}
			if !errors.Is(err, syscall.EPERM) {
				return nil, fmt.Errorf("%s %d: %w", KindUffdWP, t.pid, err)
			}
			out = out[:n]
		}
		out = append(out, r)
		if err := t.arm(r); err == nil {
			regs = append(regs, r)
		}
	}
	t.regs = regs
	return merge(out), nil
}

// scan appends the written regions of r to out and re-protects them.
func (t *uffdWP) scan(r Range, out []Range) ([]Range, error) {
	for at := r.Start; at < r.End; {
		n, end, err := t.pm.Scan(linux.ScanArgs{
			Flags: linux.ScanWPMatching | linux.ScanCheckWPAsync,
			Start: at, End: r.End,
			Mask: linux.PageIsWritten, Return: linux.PageIsWritten,
		}, t.vec)
		if err != nil {
			return out, err
		}
		for _, v := range t.vec[:n] {
			out = append(out, Range{v.Start, v.End})
		}
		if end <= at {
			return out, fmt.Errorf("PAGEMAP_SCAN %#x-%#x made no progress", at, r.End)
		}
		at = end
	}
	return out, nil
}

// Stop unregisters every mapping (which drops the protection) and closes
// phaul's userfaultfd, the only one left.
func (t *uffdWP) Stop() error {
	if t.uffd == nil {
		return nil
	}
	for _, r := range t.regs {
		// A mapping gone since the last Collect fails; nothing to undo.
		t.uffd.Unregister(linux.UffdRange{Start: r.Start, Len: r.End - r.Start})
	}
	err := t.uffd.Close()
	t.uffd = nil
	if t.pm != nil {
		t.pm.Close()
	}
	return err
}

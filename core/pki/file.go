package pki

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// writeFile writes data to dir/name atomically: a temporary file in dir is
// written, fsynced and then renamed over name (replace) or hard-linked to
// name, which fails with fs.ErrExist if name exists (!replace). The directory
// is fsynced last so the new name survives a crash.
func writeFile(dir, name string, data []byte, perm fs.FileMode, replace bool) (err error) {
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	tmp := f.Name()
	defer func() {
		// After a link the temporary name goes in every case; after a
		// rename it no longer exists and Remove fails harmlessly.
		if rerr := os.Remove(tmp); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) && err == nil {
			err = fmt.Errorf("write %s: %w", name, rerr)
		}
	}()
	if err := writeSync(f, data, perm); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	final := filepath.Join(dir, name)
	if replace {
		err = os.Rename(tmp, final)
	} else {
		err = os.Link(tmp, final)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// writeSync sets perm on f, writes data, fsyncs and closes f.
func writeSync(f *os.File, data []byte, perm fs.FileMode) (err error) {
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	// CreateTemp makes 0600 files; Chmod is not subject to the umask.
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	return f.Sync()
}

// syncDir fsyncs directory dir so that renames and links in it are durable.
func syncDir(dir string) (err error) {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := d.Close(); err == nil {
			err = cerr
		}
	}()
	return d.Sync()
}

// exists reports whether path exists; errors other than fs.ErrNotExist are
// returned.
func exists(path string) (bool, error) {
	_, err := os.Lstat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	default:
		return false, err
	}
}

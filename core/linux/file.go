package linux

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// OpenTmpfile creates an unnamed regular file in dir (O_TMPFILE), open for
// reading and writing, mode 0600: it has no name until LinkTmpfile gives it
// one, so nothing of it outlives the process otherwise. Filesystems without
// O_TMPFILE fail with an error wrapping errors.ErrUnsupported.
func OpenTmpfile(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) {
			err = fmt.Errorf("%w: %w", errors.ErrUnsupported, err)
		}
		return nil, fmt.Errorf("O_TMPFILE in %s: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), dir+"/(tmpfile)"), nil
}

// LinkTmpfile names a file from OpenTmpfile: path must be on the same
// filesystem and must not exist (an error wrapping fs.ErrExist if it does).
// Linking through /proc/self/fd needs no capability, unlike AT_EMPTY_PATH.
func LinkTmpfile(f *os.File, path string) error {
	src := "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))
	if err := unix.Linkat(unix.AT_FDCWD, src, unix.AT_FDCWD, path, unix.AT_SYMLINK_FOLLOW); err != nil {
		return &os.LinkError{Op: "linkat", Old: src, New: path, Err: err}
	}
	return nil
}

// StartWriteback starts writing the dirty pages of f in [off, off+n) to
// disk without waiting for them (sync_file_range SYNC_FILE_RANGE_WRITE), so
// that a later fsync finds little left to do. It is a hint: it makes
// nothing durable.
func StartWriteback(f *os.File, off, n int64) error {
	if err := unix.SyncFileRange(int(f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE); err != nil {
		return fmt.Errorf("sync_file_range: %w", err)
	}
	return nil
}

// PrivateDir makes dir (and missing parents) with mode 0700 and refuses
// one that another user could write into or swap: it must be a real
// directory (not a symlink) of this user that neither group nor others
// may read, write or search. phaul's work dirs and the page store's
// staging use it: root writes there what is later restored as root, and
// follows paths inside.
func PrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	switch {
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return fmt.Errorf("%s is a symlink: want a directory of its own", dir)
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("%s is not a directory", dir)
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("%s belongs to uid %d, not this user (%d): chown it, or choose another", dir, st.Uid, os.Geteuid())
	case st.Mode&0o077 != 0:
		return fmt.Errorf("%s has mode %#o: group and others must have no access (chmod 700 %s)", dir, st.Mode&0o777, dir)
	}
	return nil
}

// DiskFree returns the bytes of the filesystem holding path that an
// unprivileged writer may still use (statfs f_bavail * f_bsize).
func DiskFree(path string) (uint64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return st.Bavail * uint64(st.Bsize), nil
}

// DiskUsage returns the bytes the files under dir occupy on disk
// (st_blocks), symlinks not followed.
func DiskUsage(dir string) (uint64, error) {
	var total uint64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // went meanwhile
			}
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil
			}
			return err
		}
		total += uint64(st.Blocks) * 512
		return nil
	})
	return total, err
}

package linux

import (
	"errors"
	"fmt"
	"os"
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

package images

import "syscall"

// noFollow refuses to write through a symlink planted in the receive dir.
const noFollow = syscall.O_NOFOLLOW

// Package lazy is phaul's userfaultfd lazy-pages daemon, the replacement
// for `criu lazy-pages`: it takes the restored tasks' userfaultfds from
// `criu restore --lazy-pages` on lazy-pages.socket, serves their page faults
// from a Source and fills the remaining lazy pages in the background, so the
// restored tree runs before all of its memory is in place. It knows nothing
// of migrations: the Source decides where pages come from (ImageSource
// reads an images dir; phaul's destination reads from the source host).
//
// # Use
//
//	d, err := lazy.Listen(lazy.Config{WorkDir: wd, ImagesDir: dir, Source: src})
//	// start criu restore --lazy-pages with work dir wd
//	err = d.Serve(ctx) // nil: every lazy page is in place
//	d.Close()
//
// # Protocol
//
// The restore connects once and sends, per task, its vpid (int32, host
// order) and then one byte carrying the task's userfaultfd (SCM_RIGHTS); a
// zombie sends -vpid alone. After the last task it sends the finish word
// 0x52535446 and closes the socket when it exits. Each part is read with
// its exact size, so a descriptor is only taken with the byte it came with.
// The lazy ranges of a task are the PE_LAZY entries of pagemap-<vpid>.img
// inside the VMAs of mm-<vpid>.img that CRIU registers (anonymous private,
// not locked, hugetlb, vDSO, vvar or vsyscall), split at VMA boundaries.
//
// # Design
//
// One goroutine, the loop, owns all state and is the only one that reads
// userfaultfd events and issues UFFDIO_COPY/ZEROPAGE/WAKE. Reading an
// event and applying it must not be separated by a copy: once REMOVE
// (madvise) is read the kernel lets copies into that range succeed again,
// so a copy of data read earlier would bring back old contents. Other
// goroutines only wait or read pages:
//
//   - a waiter per userfaultfd blocks in the Go poller until it is
//     readable and tells the loop, without reading; it waits again after
//     the loop drained it;
//   - FaultReads fetchers read single faulted pages from the Source, and
//     three fetchers read background chunks, so a fault's read never waits
//     behind a long background read (a Source over the network may take
//     milliseconds per chunk) and the fill keeps three reads in flight;
//   - the control reader decodes the restore's records and loads each
//     task's ranges from the images.
//
// The loop first handles every ready event (faults, FORK, REMAP, REMOVE,
// UNMAP) and fault data, and only then copies background data, one slice
// of at most 256 KiB per step, so a fault waits for at most one slice of
// copying (the VM measured here touches fresh memory at ~0.4 GB/s: 0.6 ms).
//
// A fault on a missing lazy page starts a one-page read (unless a read for
// it is in flight already), and its data is copied with UFFDIO_COPY mode 0,
// which wakes the thread. A fault outside the lazy ranges, or on a lazy
// page already dropped, gets UFFDIO_ZEROPAGE. Background reads start after
// the finish marker, as CRIU's daemon does: up to four read or waiting to be
// copied (three reading at once), from the missing
// pages nearest after the last fault (then after the last chunk, wrapping
// around), 64 KiB after a fault and growing by 64 KiB a read up to
// MaxChunkBytes. Data is copied only into pages still missing when it
// arrives, found by image address, so a copy never lands where an event
// dropped or moved pages in the meantime, and a page copied by a fault is
// skipped by the background. A forked child gets a copy of its parent's
// missing pages with the parent's image id; data read for either is copied
// into both.
//
// Copy errors, as CRIU's daemon and the kernel define them: EAGAIN with
// nothing copied means the mm is changing (an event is due): the data is
// applied again after the next events, or after 1 ms. EEXIST means the
// page is present: it is dropped. ENOENT means no registered VMA holds the
// whole range (a VMA split since the dump): the copy goes on page by page,
// and a page no VMA holds is dropped. ESRCH or ENOSPC mean the task exited:
// it is dropped. Threads waiting on a fault whose page is dropped or moved
// are woken (UFFDIO_WAKE) and fault again, to find the page zero, present
// or gone. REMOVE does not unregister the range, unlike CRIU: faults there
// get the zero page until the daemon ends, and the process's VMAs are not
// split.
//
// Serve returns once the restore finished and no lazy page is missing,
// and closes the userfaultfds: the kernel serves later faults as for any
// anonymous memory. After an error it keeps them open, since a missing page
// would read as zeros once they are closed: the caller kills the restored
// tree, then calls Close.
//
// # A tree that stays held
//
// A restore can hold its tree rebuilt but not resumed for as long as it
// likes (CRIU's post-restore notification); it sends the finish marker only
// once the tree resumes. If the daemon is to end first, Detach has it fill
// every lazy page at once (UFFDIO_COPY works while the tasks wait in CRIU's
// restorer), count the tasks in from pstree.img (each sends its record
// before post-restore), close the userfaultfds and keep its end of the
// connection open: it sends that end's descriptor to the restore's end,
// which never reads, so it stays queued there until the restore's end
// closes (it sits in CRIU's fdstore until CRIU exits). Were it closed,
// the marker's send would fail with EPIPE and CRIU would kill the tree
// (criu/cr-restore.c: lazy_pages_finish_restore, out_kill_network_unlocked):
// safe, as no page reads as zero, but the tree is lost. A Serve that fails
// after Detach closes its end (keeping the userfaultfds until Close, as
// after any error), so a tree with missing pages can only die that way,
// never run.
package lazy

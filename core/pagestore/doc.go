// Package pagestore keeps the memory pages of a CRIU dump, keyed by pagemap
// (task or shared-memory segment) and page address, and writes them out as
// the pagemap-*.img and pages-*.img images that `criu restore` (4.2) reads.
//
// A Store is what a page server writes into and what post-copy faults read
// from: Add records pages as CRIU's page-server client sends them (PE_*
// flags, data only for PE_PRESENT), the newest copy of a page replacing
// older ones; Read returns the newest content of any page at random; Commit
// writes the image set once, after the last Add.
//
// # Storage
//
// Page bytes live in spool files in Config.SpoolDir that have no name
// (O_TMPFILE), so a crash leaves no page data behind: each key has its own
// (the first 64 keys; the rest share one). A page that is all zeros costs
// no spool space: it is recorded as a zero page. An index in memory (8
// bytes a page, in 2 MiB chunks) maps each recorded page to its flags and
// spool slot; a newer copy overwrites the slot in place, a slot freed by a
// page turning zero or contentless is reused. Config.MaxBytes bounds the
// bytes held (non-zero present pages), Config.MaxPages the pages recorded
// of every kind (the index's memory); an Add that would exceed either fails
// with ErrLimit and changes nothing.
//
// While a key's pages arrive in address order, as a dump sends them, and
// later copies only replace data with data, as pre-copy rounds do, its
// spool is laid out as its pages image: every page with content at its
// image offset, zero pages as holes. Such a spool is handed to writeback
// as it grows (unless NoSync), and Commit links it into place instead of
// copying it, so Commit costs an fsync of what writeback has not written
// yet. Any other order makes it a plain spool, copied by Commit.
//
// With Config.Levels a task's spool that lost its order is not copied
// either: the layout it had when the order broke (pre-copy's round 1,
// typically) becomes a parent level, Dir/parent/pagemap-<vpid>.img and
// pages-<n>.img linked from the spool, and the top level's pages image
// holds only the pages placed elsewhere since; the top pagemap marks the
// rest PE_PARENT. CRIU restores such a chain itself, but without a parent
// its restorer reads pages straight into their final mappings, with one
// it premaps them first: measured here at 512 MiB, the restore costs
// what the copy saves but for about 200 ms.
//
// # Images
//
// For each key Commit writes, in key order (tasks, then shared memory, by
// id), pagemap-<vpid>.img or pagemap-shmem-<shmid>.img and pages-<n>.img with
// n = 1, 2, ...:
//
//	pagemap: u32 0x54564319 (IMG_COMMON) | u32 0x56084025 (PAGEMAP)
//	         then records [u32 size, little-endian][protobuf]:
//	         PagemapHead{pages_id: n}, then PagemapEntry{vaddr,
//	         compat_nr_pages: 0, flags, nr_pages} sorted by vaddr, one per
//	         run of consecutive pages with equal flags
//	pages:   the bytes of the PE_PRESENT pages in pagemap order; zero pages
//	         are sparse holes (they read back as zeros, use no blocks)
//
// This is what CRIU 4.2's own writer produces: it fills nr_pages (field 5,
// u64) and leaves the required compat_nr_pages (field 2) at 0, so CRIU 4.1
// cannot read these images. Zero pages stay in the pagemap as present: a
// page missing from the pagemap of a file-backed private mapping would be
// restored with the file's content instead of zeros.
//
// # Crash safety
//
// Commit writes (or links) every file into the staging directory Dir +
// ".partial", fsyncs each file and the directory, then moves the pages files and after
// them the pagemap files into Dir (link, then unlink: an existing file is
// never overwritten) and fsyncs Dir. A crash therefore leaves either the
// complete set in Dir or staged files in Dir + ".partial", which Partial
// reports; a pagemap present in Dir always has its pages file beside it.
// Commit refuses to run over a partial set: remove it first.
//
// # Concurrency
//
// All methods are safe for concurrent use. Adds to different keys run in
// parallel; calls for one key are serialised. Read runs in parallel with
// Reads and with Commit.
package pagestore

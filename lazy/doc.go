// Package lazy will be phaul's userfaultfd lazy-pages daemon: it takes the
// restored tasks' userfaultfds from CRIU's restore (lazy-pages.socket), serves
// page faults from the source over the migration's connection and fills the
// rest in the background, so the workload runs before all of its memory has
// arrived (post-copy and hybrid modes).
//
// Nothing is implemented yet; see docs/protocol.md for the phases it will
// join.
package lazy

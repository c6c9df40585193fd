// Package linux is phaul's fence around the kernel: it is the only package
// that imports golang.org/x/sys/unix or unsafe.
//
// It has one file per kernel interface (uffd.go, pagemap.go, softdirty.go,
// pidfd.go, ptrace.go, cgroup.go, kernel.go, cpu.go, proc.go, socket.go,
// nftables.go with its netlink codec in nftables_netlink.go)
// and exports typed functions only: addresses are uint64, lengths name their
// unit, file descriptors live in owner types (*os.File, *net.UnixConn, *Uffd,
// *Pidfd, *Pagemap) with an idempotent Close.
//
// Feature probes (HavePagemapScan, HaveSoftDirty, HaveUserfaultfd,
// HavePidfdGetfd, HaveFreezerV2, ...) run once and cache only conclusive
// answers: nil (supported) or an error wrapping ErrNotSupported. Any other
// error (out of fds, interrupted read) is returned and the probe runs again
// on the next call. Probes are safe for concurrent use.
//
// Kernel structures that x/sys/unix lacks (struct uffdio_*, struct
// pm_scan_arg, struct page_region) are mirrored here; the tests pin their
// sizes with unsafe.Sizeof. The ioctl numbers are those of linux/amd64.
package linux

// Package testenv is phaul's test harness: gates that skip loudly, stand-in
// hosts made of network namespaces, and a self-verifying workload to migrate.
//
// Gates (RequireRoot, RequireCRIU, RequireCommand) skip with the reason, except
// on CI (CI=true), where a missing CRIU or command fails the test: CI must not
// pass by skipping the end-to-end suite.
//
// NewHosts runs test/hosts.sh with a prefix unique to the test, giving three
// namespaces joined pairwise by veth (no bridge, so the same names and
// addresses repeat in every set without clashing):
//
//	link     addresses                  notes
//	src-dst  10.77.0.1 - 10.77.0.2      the migration link; HostsOpts shape it
//	cli-src  10.77.1.1 - 10.77.1.2
//	cli-dst  10.77.2.1 - 10.77.2.2
//
// (*Netns).Command runs a program inside a namespace through nsenter --net,
// which enters the network namespace only. ip netns exec would also unshare a
// mount namespace, and a tree outside CRIU's own mount namespace makes CRIU
// dump that namespace.
//
// StartWorkload runs test/workload/workload.c as the init of a new PID
// namespace and the leader of a new session (the root CRIU wants to dump),
// inside a Netns, with its output in files: nothing ties it to the test but
// its log, so a restored copy is found, checked and killed the same way
// (Running, CheckHealthy, cleanup). Its log format is documented at the top of
// workload.c; Steps and Health read it. CorruptPage writes into its memory, the
// negative control that proves the checks can fail. StartUnixSink runs the
// outside peer that WorkloadOpts.ExtUnix needs.
//
// For CRIU, run it inside the tree's netns (Netns.Command), so the netns is
// not dumped; the flags each mode needs are listed in WorkloadOpts. There TCP
// connections are locked per connection with iptables unless CRIU gets
// --network-lock nftables (this machine kind has no iptables).
//
// Helpers that take a testing.TB call its Fatal on failure and may be used
// from the test's goroutine only.
package testenv

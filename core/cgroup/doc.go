// Package cgroup manages the cgroups phaul creates for itself: one group per
// migration, phaul/<name>, in the cgroup v1 freezer hierarchy and in the
// cgroup v2 hierarchy, whichever are mounted. It never writes to a cgroup it
// did not create: Create refuses a name that already exists.
//
// The destination starts CRIU's restore inside such a group, so the restored
// tree lands there (not in the service's own unit) and its members can be
// listed, continued or killed as a whole.
package cgroup

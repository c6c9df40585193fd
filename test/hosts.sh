#!/usr/bin/env bash
# hosts.sh: three network namespaces that stand in for phaul's hosts.
#
#   hosts.sh up [--rate RATE] [--delay MS]   create them (replacing leftovers)
#   hosts.sh down                            remove them (idempotent)
#   hosts.sh status                          show them; exit 1 if none exist
#
# Namespaces are $PHAUL_NS_PREFIX-src, -dst and -cli (prefix default "phaul"),
# so parallel runs with different prefixes do not collide. No bridge: one veth
# pair per pair of hosts, created directly inside the namespaces, so the same
# interface names and addresses repeat in every set without clashing:
#
#   link      namespace  interface  address       namespace  interface  address
#   src-dst   src        to-dst     10.77.0.1/24  dst        to-src     10.77.0.2/24
#   cli-src   cli        to-src     10.77.1.1/24  src        to-cli     10.77.1.2/24
#   cli-dst   cli        to-dst     10.77.2.1/24  dst        to-cli     10.77.2.2/24
#
# --rate shapes both directions of the src-dst link with tbf (a tc rate such as
# 100mbit); --delay adds MS milliseconds each way with netem. Exit status 3
# means the kernel lacks a needed qdisc (this script then removes what it made).
# test/testenv mirrors this table: change both together.
set -euo pipefail

prefix=${PHAUL_NS_PREFIX:-phaul}
src=$prefix-src dst=$prefix-dst cli=$prefix-cli

# One line per link: nsA ifA addrA nsB ifB addrB.
links=(
	"$src to-dst 10.77.0.1 $dst to-src 10.77.0.2"
	"$cli to-src 10.77.1.1 $src to-cli 10.77.1.2"
	"$cli to-dst 10.77.2.1 $dst to-cli 10.77.2.2"
)

die() {
	echo "hosts.sh: $2" >&2
	exit "$1"
}

exists() { [[ -e /run/netns/$1 ]]; }

down() {
	local ns
	for ns in "$src" "$dst" "$cli"; do
		# Deleting a namespace deletes its veth ends and so their peers.
		# Another run may delete it at the same time: only failing to
		# make it go away is an error.
		if exists "$ns" && ! ip netns delete "$ns" && exists "$ns"; then
			die 1 "cannot delete namespace $ns"
		fi
	done
}

# shape DEV-in-NS: netem (delay) at the root with tbf (rate) below it.
shape() {
	local ns=$1 dev=$2 parent=root
	if [[ -n $delay ]]; then
		tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "${delay}ms" ||
			die 3 "netem delay failed: kernel without sch_netem?"
		parent="parent 1:1"
	fi
	if [[ -n $rate ]]; then
		# shellcheck disable=SC2086 # $parent is two words on purpose
		tc -n "$ns" qdisc add dev "$dev" $parent handle 10: tbf rate "$rate" \
			burst 256kb latency 100ms ||
			die 3 "tbf rate $rate failed: kernel without sch_tbf?"
	fi
}

# wait_up waits for every veth to report operstate UP: the kernel's link
# watcher sets it up to a second after both ends are up.
wait_up() {
	local l na ia nb ib tries
	for l in "${links[@]}"; do
		read -r na ia _ nb ib _ <<<"$l"
		for tries in {1..100}; do
			if [[ $(ip -n "$na" -br link show dev "$ia") == *" UP "* &&
				$(ip -n "$nb" -br link show dev "$ib") == *" UP "* ]]; then
				continue 2
			fi
			sleep 0.05
		done
		die 1 "link $na/$ia - $nb/$ib not up after 5 s"
	done
}

up() {
	rate='' delay=''
	while (($#)); do
		case $1 in
		--rate) rate=${2:?--rate needs a value} && shift 2 ;;
		--delay) delay=${2:?--delay needs a value} && shift 2 ;;
		*) die 2 "unknown argument: $1" ;;
		esac
	done
	[[ -z $delay || $delay =~ ^[0-9]+$ ]] || die 2 "--delay wants whole milliseconds"
	[[ -z $rate || $rate =~ ^[0-9]+[a-zA-Z]*$ ]] || die 2 "--rate wants a tc rate like 100mbit"

	down
	trap 'rc=$?; down; exit $rc' ERR EXIT
	local ns l
	for ns in "$src" "$dst" "$cli"; do
		ip netns add "$ns"
		ip -n "$ns" link set lo up
	done
	for l in "${links[@]}"; do
		read -r na ia aa nb ib ab <<<"$l"
		ip -n "$na" link add "$ia" type veth peer name "$ib" netns "$nb"
		ip -n "$na" addr add "$aa/24" dev "$ia"
		ip -n "$nb" addr add "$ab/24" dev "$ib"
		ip -n "$na" link set "$ia" up
		ip -n "$nb" link set "$ib" up
	done
	if [[ -n $rate || -n $delay ]]; then
		shape "$src" to-dst
		shape "$dst" to-src
	fi
	wait_up
	trap - ERR EXIT
	status
}

status() {
	local ns any=0
	for ns in "$src" "$dst" "$cli"; do
		exists "$ns" || continue
		any=1
		echo "$ns"
		ip -n "$ns" -br -4 addr show | sed 's/^/  /'
		tc -n "$ns" qdisc show | grep -Ev 'noqueue|pfifo_fast' | sed 's/^/  /' || true
	done
	((any)) || {
		echo "$prefix: down"
		return 1
	}
}

case ${1:-} in
up) shift && up "$@" ;;
down) down ;;
status) status ;;
*) die 2 "usage: hosts.sh up [--rate RATE] [--delay MS] | down | status" ;;
esac

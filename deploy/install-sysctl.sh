#!/usr/bin/env bash
# install-sysctl.sh: installs deploy/sysctl.d/90-phaul-pipe-max-size.conf
# into /etc/sysctl.d and applies it. A host sysctl is the operator's
# decision: phaul never runs this; `make sysctl` does, on request.
#   install-sysctl.sh          install and apply
#   install-sysctl.sh --undo   remove it and restore the value saved at install
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
conf=90-phaul-pipe-max-size.conf
dst=/etc/sysctl.d/$conf
saved=/etc/sysctl.d/.$conf.before
key=/proc/sys/fs/pipe-max-size

die() { echo "install-sysctl.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

if [ "${1:-}" = --undo ]; then
	[ -f "$dst" ] || die "$dst is not installed"
	rm -f "$dst"
	if [ -f "$saved" ]; then
		cat "$saved" >"$key"
		rm -f "$saved"
	fi
	echo "fs.pipe-max-size is $(cat "$key") again; $dst removed"
	exit 0
fi
[ $# -eq 0 ] || die "usage: install-sysctl.sh [--undo]"
[ -f "$saved" ] || cat "$key" >"$saved"
install -m 0644 "$here/sysctl.d/$conf" "$dst"
value=$(sed -n 's/^fs.pipe-max-size *= *//p' "$dst")
echo "$value" >"$key" || die "cannot write $key"
echo "fs.pipe-max-size is $(cat "$key") (was $(cat "$saved")); installed $dst (undo: $0 --undo)"

#!/usr/bin/env bash
# install-criu.sh: install CRIU >= 4.2 for phaul into a private prefix.
#
# Debian bookworm's CRIU (3.17) fails `criu check` on current kernels and
# trixie's (4.1.1) cannot dump IPv4/IPv6 sockets on Linux >= 6.16, so this
# script takes CRIU and its library closure from Debian forky and unpacks them
# under PREFIX. forky's CRIU needs forky's glibc, so it runs through the
# prefix's own dynamic loader (ld-linux --library-path), never touching
# /etc/apt, the system dpkg database or the system's libraries.
#
# Usage: deploy/install-criu.sh [--prefix DIR] [--force]
#   --prefix DIR   install into DIR (default: $PHAUL_CRIU_PREFIX or /opt/phaul/criu)
#   --force        reinstall even if a working CRIU is already in DIR
#
# Environment:
#   PHAUL_CRIU_PREFIX    default prefix
#   PHAUL_CRIU_SUITE     Debian suite to take CRIU from (default: forky)
#   PHAUL_DEBIAN_MIRROR  Debian archive URI (default: the one in /etc/apt)
#
# Result: $PREFIX/bin/criu, a wrapper that behaves like the criu binary
# (arguments and file descriptors pass through unchanged, so `criu swrk 3`
# works). Progress goes to stderr; the wrapper path is the only stdout line.
#
# Layout of PREFIX:
#   bin/criu           the wrapper (written last: its presence means "installed")
#   usr/sbin/criu      forky's binary; usr/lib/<multiarch>/ its libraries and ld-linux
#   .apt/              private apt config, lists, cache and an empty dpkg status
#   .phaul-criu        marker + manifest (packages and versions unpacked)
#   .lock              flock(1) lock serialising concurrent runs
set -euo pipefail

readonly MIN_VERSION=4.2
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

PREFIX=${PHAUL_CRIU_PREFIX:-/opt/phaul/criu}
SUITE=${PHAUL_CRIU_SUITE:-forky}
FORCE=0

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() {
	printf 'install-criu: error: %s\n' "$*" >&2
	exit 1
}

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; }

while [ $# -gt 0 ]; do
	case $1 in
	--prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
	--prefix=*) PREFIX=${1#--prefix=}; shift ;;
	--force) FORCE=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage; die "unknown argument: $1" ;;
	esac
done

case $PREFIX in
/*) ;;
*) die "prefix must be an absolute path: $PREFIX" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die "refusing to use / as the prefix"
case $PREFIX in
*"'"* | *[[:space:]]*) die "prefix must not contain quotes or whitespace: $PREFIX" ;;
esac

readonly WRAPPER=$PREFIX/bin/criu
readonly MARKER=$PREFIX/.phaul-criu
readonly APTDIR=$PREFIX/.apt

# criu_version prints the version of the criu at $1 ("4.2.1"), or nothing.
criu_version() {
	"$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1
}

# version_ge succeeds if version $1 >= version $2.
version_ge() {
	printf '%s\n%s\n' "$2" "$1" | sort -V -C
}

# criu_ok succeeds if the wrapper exists, is new enough and `criu check` passes.
criu_ok() {
	local v
	[ -x "$WRAPPER" ] || return 1
	v=$(criu_version "$WRAPPER")
	[ -n "$v" ] && version_ge "$v" "$MIN_VERSION" || return 1
	"$WRAPPER" check >/dev/null 2>&1
}

# --- system prerequisites (system apt, only for what is missing) -----------

# pkg_installed succeeds if dpkg reports package $1 as installed.
pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

ensure_system_packages() {
	local missing=() p
	# apt/dpkg-deb/gpgv come with apt itself; the keyring signs forky's Release;
	# ca-certificates for https mirrors; the rest is what the tests use:
	# ip and tc (iproute2), unshare and nsenter (util-linux), gcc and make.
	for p in debian-archive-keyring ca-certificates iproute2 util-linux gcc make; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		install_system_packages "${missing[@]}"
	fi
	for p in ip tc unshare nsenter gcc make flock; do
		command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || [ -x "/sbin/$p" ] ||
			log "warning: $p not found in PATH"
	done
}

install_system_packages() {
	local missing=("$@")
	[ "$(id -u)" -eq 0 ] || die "missing system packages (${missing[*]}); run as root"
	log "installing missing system packages with the system apt: ${missing[*]}"
	# The system lists may be stale or absent on a fresh machine: refresh first.
	DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 update >&2 ||
		log "warning: system apt-get update failed; trying the install anyway"
	DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=300 --no-install-recommends install "${missing[@]}" >&2 ||
		die "system apt-get install ${missing[*]} failed"
}

# --- private apt ------------------------------------------------------------

# debian_mirror prints the Debian archive URI the system's apt uses
# (the first non-security ".../debian" URI in /etc/apt), or nothing.
debian_mirror() {
	local f
	{
		for f in /etc/apt/sources.list.d/*.sources; do
			[ -f "$f" ] || continue
			# deb822: "URIs: a b" in stanzas without "Enabled: no".
			awk 'function flush() { if (!off) for (i = 1; i <= n; i++) print u[i]; n = 0; off = 0 }
				/^[[:space:]]*$/ { flush(); next }
				tolower($1) == "enabled:" && tolower($2) == "no" { off = 1 }
				tolower($1) == "uris:" { for (i = 2; i <= NF; i++) u[++n] = $i }
				END { flush() }' "$f"
		done
		for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
			[ -f "$f" ] || continue
			# one-line: "deb [opts] URI suite comps"
			sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([^[:space:]]\+\).*/\2/p' "$f"
		done
	} | grep -E '^(https?|ftp)://[^/]+(/.*)?/debian/?$' | head -n 1 | sed 's:/*$::'
}

# write_apt_config creates the private apt tree under $APTDIR. Setting Dir::Etc
# (and with it Parts and Main) to a private directory keeps every file in
# /etc/apt out, including apt.conf.d hooks that would refresh system caches.
write_apt_config() {
	local mirror=$1 arch=$2 proxy_http='' proxy_https='' valid_until='' check_date=''
	mkdir -p "$APTDIR"/etc/apt.conf.d "$APTDIR"/etc/sources.list.d \
		"$APTDIR"/etc/preferences.d "$APTDIR"/etc/trusted.gpg.d \
		"$APTDIR"/state/lists/partial "$APTDIR"/cache/archives/partial "$APTDIR"/log
	: >"$APTDIR/state/status"
	# Carry over the system apt's proxy and Release-date policy (machines with
	# a skewed clock or a frozen mirror disable the Valid-Until check there).
	eval "$(apt-config shell proxy_http Acquire::http::Proxy proxy_https Acquire::https::Proxy \
		valid_until Acquire::Check-Valid-Until check_date Acquire::Check-Date)"
	{
		printf 'Dir::Etc "%s/etc/";\n' "$APTDIR"
		printf 'Dir::Etc::Main "apt.conf";\n'
		printf 'Dir::Etc::Parts "apt.conf.d";\n'
		printf 'Dir::Etc::SourceList "%s/etc/sources.list";\n' "$APTDIR"
		printf 'Dir::Etc::SourceParts "%s/etc/sources.list.d";\n' "$APTDIR"
		printf 'Dir::Etc::Preferences "preferences";\n'
		printf 'Dir::Etc::PreferencesParts "preferences.d";\n'
		printf 'Dir::Etc::TrustedParts "trusted.gpg.d";\n'
		printf 'Dir::State "%s/state/";\n' "$APTDIR"
		printf 'Dir::State::Lists "%s/state/lists/";\n' "$APTDIR"
		printf 'Dir::State::status "%s/state/status";\n' "$APTDIR"
		printf 'Dir::Cache "%s/cache/";\n' "$APTDIR"
		printf 'Dir::Log "%s/log/";\n' "$APTDIR"
		printf 'APT::Architecture "%s";\n' "$arch"
		printf 'APT::Architectures { "%s"; };\n' "$arch"
		printf 'Acquire::Languages "none";\n'
		printf 'Acquire::GzipIndexes "true";\n'
		[ -z "$proxy_http" ] || printf 'Acquire::http::Proxy "%s";\n' "$proxy_http"
		[ -z "$proxy_https" ] || printf 'Acquire::https::Proxy "%s";\n' "$proxy_https"
		[ -z "$valid_until" ] || printf 'Acquire::Check-Valid-Until "%s";\n' "$valid_until"
		[ -z "$check_date" ] || printf 'Acquire::Check-Date "%s";\n' "$check_date"
	} >"$APTDIR/apt.conf"
	: >"$APTDIR/etc/apt.conf"
	printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$mirror" "$SUITE" >"$APTDIR/etc/sources.list"
}

papt() { APT_CONFIG=$APTDIR/apt.conf "$@"; }

# closure prints the packages CRIU needs at run time, one per line.
closure() {
	papt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
		--no-breaks --no-replaces --no-enhances criu |
		grep -v '^[[:space:]]' | grep -v '^<' | sort -u |
		# Essential/tooling packages that may appear through Pre-Depends or
		# alternatives; CRIU loads none of them. libc6 and real libraries stay.
		grep -v -x -E 'debconf|cdebconf|perl-base|dpkg|base-files|base-passwd|bash|coreutils|debianutils|diffutils|findutils|grep|gzip|init-system-helpers|install-info|libpam-runtime|login|mawk|ncurses-bin|sed|sysvinit-utils|tar|usrmerge|usr-is-merged|util-linux|debconf-2.0|awk'
}

# --- install ----------------------------------------------------------------

install_criu() {
	local mirror arch pkgs cand n t0 deb

	arch=$(dpkg --print-architecture)
	mirror=${PHAUL_DEBIAN_MIRROR:-$(debian_mirror)}
	[ -n "$mirror" ] || die "no Debian archive URI found in /etc/apt/sources.list{,.d}; set PHAUL_DEBIAN_MIRROR"
	[ -r "$KEYRING" ] || die "$KEYRING missing (package debian-archive-keyring)"

	# Only ever delete a tree this script created.
	if [ -e "$PREFIX" ] && [ ! -e "$MARKER" ] && [ -n "$(ls -A "$PREFIX" 2>/dev/null | grep -v -x -e .lock)" ]; then
		die "$PREFIX exists, is not empty and was not made by this script; choose another --prefix"
	fi
	log "installing CRIU from Debian $SUITE ($mirror) into $PREFIX"
	rm -f "$WRAPPER"
	rm -rf "$PREFIX/usr" "$PREFIX/lib" "$PREFIX/lib64" "$PREFIX/etc" "$PREFIX/bin" "$APTDIR/debs"
	mkdir -p "$PREFIX/bin"
	printf 'phaul private CRIU prefix; made by deploy/install-criu.sh\n' >"$MARKER"
	write_apt_config "$mirror" "$arch"

	t0=$SECONDS
	log "fetching the $SUITE package lists (private apt state in $APTDIR)"
	papt apt-get -q update >&2 || die "apt-get update of $SUITE failed"

	cand=$(papt apt-cache policy criu | sed -n 's/^ *Candidate: *//p')
	case $cand in
	'' | '(none)') die "no criu package in Debian $SUITE" ;;
	esac
	# Debian versions look like [epoch:]upstream-revision.
	cand=${cand#*:}
	cand=${cand%%[-+~]*}
	version_ge "$cand" "$MIN_VERSION" ||
		die "Debian $SUITE has CRIU $cand; phaul needs >= $MIN_VERSION (refusing)"

	pkgs=$(closure)
	n=$(printf '%s\n' "$pkgs" | wc -l)
	log "downloading criu $cand and its library closure: $n packages"
	mkdir -p "$APTDIR/debs"
	# apt drops privileges to _apt for downloads: let it write there.
	if id _apt >/dev/null 2>&1; then chown _apt "$APTDIR/debs"; fi
	# shellcheck disable=SC2086 # one package name per word
	(cd "$APTDIR/debs" && papt apt-get -q download $pkgs) >&2 ||
		die "apt-get download failed"

	log "unpacking into $PREFIX"
	for deb in "$APTDIR"/debs/*.deb; do
		dpkg-deb -x "$deb" "$PREFIX" || die "dpkg-deb -x $deb failed"
		dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$MARKER"
	done
	# The .debs and apt's binary caches (~90 MB) are not needed any more;
	# the lists stay so a reinstall only refreshes them.
	rm -rf "$APTDIR/debs" "$APTDIR"/cache/*.bin
	log "downloaded and unpacked in $((SECONDS - t0)) s ($(du -sh "$PREFIX" | cut -f1) in $PREFIX)"

	write_wrapper
}

# write_wrapper writes $WRAPPER for the unpacked tree.
write_wrapper() {
	local ldso libdirs d real tmp

	# The loader: a real file (absolute symlinks would escape the prefix).
	ldso=$(find "$PREFIX/lib64" "$PREFIX/usr/lib64" "$PREFIX/lib" "$PREFIX/usr/lib" \
		-maxdepth 2 -type f -name 'ld-linux*.so.*' 2>/dev/null | head -n 1 || true)
	[ -n "$ldso" ] || die "no ld-linux*.so.* in $PREFIX"
	# The library dirs: those under the prefix holding a real shared library.
	libdirs=
	for d in "$PREFIX"/lib/*-linux-gnu* "$PREFIX"/usr/lib/*-linux-gnu* \
		"$PREFIX"/lib64 "$PREFIX"/usr/lib64; do
		[ -d "$d" ] && [ ! -L "$d" ] || continue
		[ -n "$(find "$d" -maxdepth 1 -type f -name '*.so*' -print -quit)" ] || continue
		libdirs=${libdirs:+$libdirs:}$d
	done
	[ -n "$libdirs" ] || die "no library directory in $PREFIX"
	real=$PREFIX/usr/sbin/criu
	[ -x "$real" ] || die "$real missing after unpacking"

	tmp=$WRAPPER.tmp.$$
	cat >"$tmp" <<EOF
#!/bin/sh
# CRIU from Debian $SUITE with its own glibc, written by phaul's deploy/install-criu.sh.
# Arguments and file descriptors pass through exec unchanged (criu swrk 3).
exec '$ldso' --library-path '$libdirs' --argv0 criu '$real' "\$@"
EOF
	chmod 0755 "$tmp"
	mv -f "$tmp" "$WRAPPER"
	log "wrote $WRAPPER"
}

# --- main -------------------------------------------------------------------

ensure_system_packages

if [ "$FORCE" -eq 0 ] && criu_ok; then
	log "CRIU $(criu_version "$WRAPPER") at $WRAPPER already works (criu check ok); nothing to do"
	printf '%s\n' "$WRAPPER"
	exit 0
fi

mkdir -p "$PREFIX"
exec 9>"$PREFIX/.lock"
if command -v flock >/dev/null 2>&1; then
	flock 9 || die "cannot lock $PREFIX/.lock"
fi
# Another run may have finished while this one waited for the lock.
if [ "$FORCE" -eq 1 ] || ! criu_ok; then
	install_criu
fi
exec 9>&-

version=$(criu_version "$WRAPPER")
[ -n "$version" ] || die "$WRAPPER --version printed no version"
if ! version_ge "$version" "$MIN_VERSION"; then
	rm -f "$WRAPPER"
	die "CRIU $version is older than $MIN_VERSION; phaul refuses it (removed $WRAPPER)"
fi
log "CRIU $version installed at $WRAPPER"

log "running: $WRAPPER check"
rc=0
out=$("$WRAPPER" check 2>&1) || rc=$?
printf '%s\n' "$out" | sed 's/^/install-criu:   /' >&2
if [ "$rc" -ne 0 ]; then
	die "criu check failed (exit $rc)"
fi
log "criu check passed"
printf '%s\n' "$WRAPPER"

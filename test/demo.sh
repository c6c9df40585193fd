#!/usr/bin/env bash
# demo.sh: migrate a running, self-verifying workload between two local test
# hosts (network namespaces) with phaul, show it running on the destination,
# then tear everything down. Run by `make demo` (which installs CRIU and
# builds bin/phaul and bin/workload first). Needs root.
#
#   PHAUL_DEMO_MIB   workload memory in MiB (default 256)
#   PHAUL_DEMO_RATE  shape the src-dst link, a tc rate such as 1gbit (default none)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
phaul=$root/bin/phaul
workload=$root/bin/workload
mib=${PHAUL_DEMO_MIB:-256}
export PHAUL_NS_PREFIX=phaul-demo
src=$PHAUL_NS_PREFIX-src dst=$PHAUL_NS_PREFIX-dst
demo=$(mktemp -d /tmp/phaul-demo.XXXXXX)
serve_pid=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
	set +e
	say "tearing down"
	[[ -n $serve_pid ]] && kill -TERM "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
	pkill -KILL -f -- "--log $demo/workload.log" 2>/dev/null
	sleep 0.2
	for d in /sys/fs/cgroup/freezer/phaul /sys/fs/cgroup/unified/phaul; do
		[[ -f $demo/migration-id ]] && rmdir "$d/$(cat "$demo/migration-id")" 2>/dev/null
	done
	bash test/hosts.sh down
	rm -rf "$demo"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "demo.sh: needs root (network namespaces, CRIU)" >&2; exit 1; }
[[ -x $phaul && -x $workload ]] || { echo "demo.sh: run 'make build' first" >&2; exit 1; }

say "two test hosts: $src (10.77.0.1) and $dst (10.77.0.2), joined by a veth pair"
rate_args=()
[[ -n ${PHAUL_DEMO_RATE:-} ]] && rate_args=(--rate "$PHAUL_DEMO_RATE")
bash test/hosts.sh up "${rate_args[@]}"

say "pre-flight check of this host"
"$phaul" check || true

say "certificates: one CA, a source certificate and a destination certificate"
"$phaul" certs --ca-dir "$demo/ca" --out "$demo/tls-src" --host 10.77.0.1 --role source
"$phaul" certs --ca-dir "$demo/ca" --out "$demo/tls-dst" --host 10.77.0.2 --role destination

say "destination: a restore policy that lets the demo's workload (root, all capabilities) through"
cat >"$demo/restore-policy.json" <<'POLICY'
{"allow_root": true, "allow_capabilities": true, "write_paths": ["/tmp/", "/var/tmp/", "/dev/"]}
POLICY
chmod 600 "$demo/restore-policy.json"

say "destination: phaul serve in $dst"
nsenter --net=/run/netns/$dst -- "$phaul" serve --listen 10.77.0.2:7000 \
	--work-dir "$demo/work-dst" --tls-dir "$demo/tls-dst" --allow-peer 10.77.0.1 \
	--restore-policy "$demo/restore-policy.json" 2>"$demo/serve.log" &
serve_pid=$!
for _ in $(seq 100); do grep -q 'msg=serving' "$demo/serve.log" && break; sleep 0.1; done
grep -q 'msg=serving' "$demo/serve.log" || { cat "$demo/serve.log"; exit 1; }

say "source: a ${mib} MiB workload in $src, in its own PID namespace"
nsenter --net=/run/netns/$src -- unshare --pid --fork setsid "$workload" --log "$demo/workload.log" \
	--mib "$mib" --threads 2 --rate 2000 --verify-ms 250 </dev/null >"$demo/workload.out" 2>&1 &
for _ in $(seq 300); do grep -q 'verified=[1-9]' "$demo/workload.log" 2>/dev/null && break; sleep 0.1; done
pid=$(pgrep -f -- "--log $demo/workload.log" | while read -r p; do
	[[ $(readlink /proc/"$p"/exe) == "$workload" ]] && echo "$p"; done | head -1)
echo "workload pid $pid, netns $(readlink /proc/"$pid"/ns/net)"
tail -n 2 "$demo/workload.log"

say "phaul migrate --to 10.77.0.2:7000 $pid"
nsenter --net=/run/netns/$src -- "$phaul" migrate --to 10.77.0.2:7000 --tls-dir "$demo/tls-src" \
	--work-dir "$demo/work-src" --stats-json "$demo/stats.json" "$pid"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["migration_id"])' "$demo/stats.json" >"$demo/migration-id"

say "after the migration"
sleep 1
new=$(pgrep -f -- "--log $demo/workload.log" | while read -r p; do
	[[ $(readlink /proc/"$p"/exe) == "$workload" ]] && echo "$p"; done)
echo "copies running: $(echo "$new" | wc -w) (pid $new), netns $(readlink /proc/"$new"/ns/net) = $dst's $(readlink /run/netns/$dst 2>/dev/null || stat -Lc 'net:[%i]' /run/netns/$dst)"
echo "source pid $pid exists: $([[ -d /proc/$pid ]] && echo yes || echo no)"
tail -n 3 "$demo/workload.log"
if grep -E 'CORRUPT|FAIL' "$demo/workload.log"; then echo "demo: workload reports corruption" >&2; exit 1; fi

say "stats (--stats-json)"
python3 -m json.tool "$demo/stats.json"

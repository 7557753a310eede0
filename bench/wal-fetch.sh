#!/usr/bin/env bash
# Benchmark: the cost of one `agentctl wal fetch` (restore_command) call, on a
# prefetch miss, on a hit, for a missing segment, and streamed in order, against
# a directory archive of synthetic 16 MiB segments (3 MiB random, 13 MiB text;
# zstd -1 in the fleet object format) for a made-up cluster.
#
#   FLEET_BIN_DIR=target/release bash bench/wal-fetch.sh
#
# Environment: FLEET_BIN_DIR (default target/release), BENCH_SEGMENTS (24).
# Prints its figures; writes nothing else. Not a test: it measures.
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${FLEET_BIN_DIR:-target/release}"
N="${BENCH_SEGMENTS:-24}"
H="$(mktemp -d /tmp/fleet-walfetch-XXXXXX)"
DPID=""
cleanup() {
  [[ -n "$DPID" ]] && kill -TERM "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
  rm -rf "$H"
}
trap cleanup EXIT
SYSID=4242
mkdir -p "$H/archive/$SYSID/wal" "$H/data/global" "$H/data/pg_wal" "$H/fetch" "$H/state" "$H/departments.d"
# pg_control begins with the system identifier (native endian).
python3 -c "import struct,sys; open(sys.argv[1],'wb').write(struct.pack('=Q',$SYSID)+bytes(8184))" "$H/data/global/pg_control"
seg() { printf '0000000100000000%08X' "$1"; }
for i in $(seq 1 "$N"); do
  { head -c $((3 << 20)) /dev/urandom; yes "pgbench row $i abcdefghijklmnopqrstuvwxyz" | head -c $((13 << 20)) || true; } >"$H/seg"
  sha=$(sha256sum "$H/seg" | cut -d' ' -f1)
  { printf 'FWAL1 %s\n' "$sha"; zstd -1 -q -c "$H/seg"; } >"$H/archive/$SYSID/wal/$(seg "$i").zst"
done
rm -f "$H/seg"
cat >"$H/agent.toml" <<TOML
node_id = "walfetch"
state_dir = "$H/state"
socket = "$H/agentctl.sock"
departments_dir = "$H/departments.d"
[wal]
target = "file://$H/archive"
pg_wal_dir = "$H/data/pg_wal"
[api]
listen = ""
[log]
level = "warn"
TOML
"$BIN/fleet-agentd" --config "$H/agent.toml" >"$H/daemon.log" 2>&1 &
DPID=$!
for _ in $(seq 100); do "$BIN/agentctl" --socket "$H/agentctl.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
us() { local a b; a=$(date +%s%N); "$@" || true; b=$(date +%s%N); echo $(((b - a) / 1000)); }
fetch() { rm -f "$H/fetch/RECOVERYXLOG"; "$BIN/agentctl" --socket "$H/agentctl.sock" wal fetch --system-id $SYSID "$1" "$H/fetch/RECOVERYXLOG" 2>/dev/null; }
echo "miss (segment 1, nothing prefetched): $(us fetch "$(seg 1)") us"
sleep 4
hits=""
for i in 2 3 4 5 6 7 8 9; do hits="$hits $(us fetch "$(seg "$i")")"; sleep 1.5; done
echo "hits (segments 2-9, prefetched, 1.5 s apart), us:$hits"
echo "not in the archive: $(us fetch "$(seg 200)") us"
a=$(date +%s%N); for i in $(seq 10 "$N"); do fetch "$(seg "$i")"; done; b=$(date +%s%N)
echo "streamed in order (segments 10-$N): $(((b - a) / 1000000)) ms, $(((b - a) / 1000000 / (N - 9))) ms per segment"
want=$(head -c 70 "$H/archive/$SYSID/wal/$(seg "$N").zst" | tail -c 64)
[[ "$(sha256sum "$H/fetch/RECOVERYXLOG" | cut -d' ' -f1)" == "$want" ]] && echo "last segment: checksum ok" || echo "last segment: CHECKSUM MISMATCH"

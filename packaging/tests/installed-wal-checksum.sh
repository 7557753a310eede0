#!/usr/bin/env bash
# As installed: the 0.2.0 archive object format (issue 13). In the package
# tests' systemd container, next to Debian's postgresql-15, set up as
# docs/wal.md says: the packaged WAL service (User=postgres) writes FWAL2
# objects by default (the 71-byte header of every stored object is read);
# then the operator sets `object_checksum = "sha256"` in [wal] as docs/wal.md's
# "Upgrading to 0.2.0" says and restarts the service, and every object written
# after that is FWAL1, its header the SHA-256 of the segment (decompressed with
# zstd and hashed here). A point-in-time restore whose base backup was taken
# before the switch replays FWAL2 and then FWAL1 segments to the target: the
# rows written after the base backup and before the switch (only in FWAL2
# objects), those written after the switch (only in FWAL1 objects) are back
# exactly, those after the target are not. `agentctl wal verify` checks every
# object of the mixed archive with no checksum failure; one hex digit changed
# in the header of one FWAL2 and one FWAL1 object makes it fail naming exactly
# those two, so the ok above is not an ok that cannot fail.
#
# Deviations from the docs, forced by the test rig: the cluster listens on
# 44250 instead of 5432 (the container shares the host's network); the WAL
# service is stopped, listed and started instead of restarted, so the objects
# written before the switch are known exactly.
source "$(dirname "$0")/lib.sh"
# No `cmd | grep -q` below: grep -q exits at the first match, cmd may then die of
# SIGPIPE, and pipefail turns a match into a failure.

node=$PKGTEST_NAME
# Ports 44250-44259: PostgreSQL 44250 (15/main) and 44256 (15/restored), the
# department pool 44251-44254, the API 44255. FLEET_PKGTEST_PORT_BASE (default
# 44250) moves them all, so that a run by hand can sit beside the suite's.
port_base=${FLEET_PKGTEST_PORT_BASE:-44250}
pg_port=$port_base
restored_port=$((port_base + 6))
api=127.0.0.1:$((port_base + 5))
ensure_image
deb=$(ensure_deb)
command -v zstd >/dev/null || fail "zstd is missing on the test host"

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
}
trap cleanup EXIT
cleanup
systemd_container_up "fleet-$PKGTEST_NAME"


wal_host_up $pg_port "$deb"

# --- Set-up, as docs/wal.md says (the port aside); object_checksum unset.
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "$((port_base + 1))-$((port_base + 4))"
[api]
listen = "$api"
[wal]
target = "file:///var/backups/fleet-agent"
socket = "/run/fleet-agent-wal/wal.sock"
postgres = "host=/var/run/postgresql port=$pg_port user=postgres"
pg_wal_dir = "/var/lib/postgresql/15/main/pg_wal"
TOML
# As postgres, sandboxed, without capabilities (lib.sh).
wal_service_up
wal_archiving_on 60s

sysid=$(in_ct od -An -t u8 -N 8 /var/lib/postgresql/15/main/global/pg_control | tr -d ' ')
wal_dir=/var/backups/fleet-agent/$sysid/wal
# NAME MAGIC for every stored WAL object, MAGIC the header's (FWAL1, FWAL2)
# when its first 71 bytes are one (magic, 64 lowercase hex digits, newline),
# else BAD. Hidden names are a directory target's temp files.
headers() {
    in_ct python3 - "$wal_dir" <<'PY'
import os, re, sys
d = sys.argv[1]
for n in sorted(os.listdir(d)):
    if n.startswith(".") or not n.endswith(".zst"):
        continue
    with open(os.path.join(d, n), "rb") as f:
        head = f.read(71)
    m = re.fullmatch(rb"(FWAL[12]) [0-9a-f]{64}\n", head)
    print(n[:-len(".zst")], m.group(1).decode() if m else "BAD")
PY
}
stored() { in_ct test -f "$wal_dir/$1.zst"; }
# Writes, commits, and closes the segment that holds them; waits until it is stored.
switched() { # WHAT: the segment switched
    local segment
    segment=$(psql_at $pg_port 'SELECT pg_walfile_name(pg_current_wal_lsn())')
    psql_at $pg_port 'SELECT pg_switch_wal()' >/dev/null
    wal_wait_for 60 "$segment ($1) was not archived" stored "$segment"
    echo "$segment"
}

# --- 0.2.0's default: FWAL2, and a base backup taken under it.
log "FWAL2 by default: writes, a base backup, more writes"
psql_at $pg_port "CREATE TABLE marks (id serial PRIMARY KEY, phase text NOT NULL);
    INSERT INTO marks (phase) SELECT 'base' FROM generate_series(1, 1000)" >/dev/null
switched "before the base backup" >/dev/null
out=$(in_ct agentctl backup create 2>&1) || { wal_journal; fail "agentctl backup create: $out"; }
backup=$(in_ct agentctl backup list --json | python3 -c 'import json,sys; b=json.load(sys.stdin)[-1]; print(b["id"], b["start_wal"])')
read -r backup_id start_wal <<<"$backup"
# Only in WAL after the base backup, before the switch: only in FWAL2 objects.
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'fwal2' FROM generate_series(1, 700)" >/dev/null
fwal2_segment=$(switched "written under FWAL2")
wal_wait_for 30 "the base backup's start segment $start_wal was not archived" stored "$start_wal"

# Every stored object so far, with the service stopped so none is added while listed.
in_ct systemctl stop fleet-agent-wal
before=$(headers)
[ -n "$before" ] || fail "no object in $wal_dir"
bad=$(grep -v ' FWAL2$' <<<"$before" || true)
[ -z "$bad" ] || fail "objects written by default are not all FWAL2: $bad"
grep -qx "$start_wal FWAL2" <<<"$before" || fail "the base backup's start segment $start_wal is not stored as FWAL2: $before"
grep -qx "$fwal2_segment FWAL2" <<<"$before" || fail "$fwal2_segment is not stored as FWAL2: $before"
log "FWAL2 by default: $(wc -l <<<"$before") objects, backup $backup_id from $start_wal"

# --- The operator's switch, as docs/wal.md says: object_checksum = "sha256" in [wal].
log "object_checksum = \"sha256\""
in_ct sed -i '/^pg_wal_dir = /a object_checksum = "sha256"' /etc/fleet-agent/agent.toml
in_ct fleet-agentd check-config >/dev/null || fail "check-config refused object_checksum = \"sha256\""
in_ct systemctl start fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not start with sha256"; }

# Only in WAL after the switch: only in FWAL1 objects.
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'fwal1' FROM generate_series(1, 500)" >/dev/null
fwal1_segment=$(switched "written under FWAL1")
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'fwal1' FROM generate_series(1, 300)" >/dev/null
history=$(psql_at $pg_port "SELECT phase || '=' || count(*) FROM marks GROUP BY phase ORDER BY phase" | paste -sd' ')
at=$(psql_at $pg_port 'SELECT now()')
sleep 1.5
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'after' FROM generate_series(1, 200)" >/dev/null
last_segment=$(switched "past the target time")
log "target time $at ($history)"

after=$(headers)
new=$(comm -13 <(sort <<<"$before") <(sort <<<"$after"))
[ -n "$new" ] || fail "nothing stored after the switch"
bad=$(grep -v ' FWAL1$' <<<"$new" || true)
[ -z "$bad" ] || fail "objects written after object_checksum = \"sha256\" are not all FWAL1: $bad"
grep -qx "$fwal1_segment FWAL1" <<<"$new" || fail "$fwal1_segment is not a new FWAL1 object: $new"
grep -qx "$last_segment FWAL1" <<<"$new" || fail "$last_segment is not a new FWAL1 object: $new"
# What was stored before the switch is all still there, still FWAL2.
[ "$(comm -23 <(sort <<<"$before") <(sort <<<"$after"))" = "" ] || fail "an object written before the switch changed"
# An FWAL1 header is the SHA-256 of the segment: decompressed here, with zstd.
in_ct cat "$wal_dir/$fwal1_segment.zst" >"$PKGTEST_CACHE/$PKGTEST_NAME.obj"
recorded=$(head -c 71 "$PKGTEST_CACHE/$PKGTEST_NAME.obj" | cut -c7-70)
content=$(tail -c +72 "$PKGTEST_CACHE/$PKGTEST_NAME.obj" | zstd -dcq | sha256sum | cut -c1-64)
size=$(tail -c +72 "$PKGTEST_CACHE/$PKGTEST_NAME.obj" | zstd -dcq | wc -c)
rm -f "$PKGTEST_CACHE/$PKGTEST_NAME.obj"
[ "$recorded" = "$content" ] || fail "$fwal1_segment's FWAL1 header records $recorded, its content's SHA-256 is $content"
[ "$size" = 16777216 ] || fail "$fwal1_segment decompresses to $size bytes, not a 16 MiB segment"
log "after the switch: $(wc -l <<<"$new") new objects, all FWAL1; $fwal1_segment's header is its SHA-256"

# --- Point-in-time restore across the mixed archive, as docs/wal.md says.
log "restore to $at from backup $backup_id"
in_ct pg_createcluster 15 restored -p $restored_port >/dev/null || fail "pg_createcluster failed"
in_ct rm -r /var/lib/postgresql/15/restored
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/15/restored
out=$(in_ct agentctl restore --to /var/lib/postgresql/15/restored --target-time "$at" 2>&1) \
    || { wal_journal; fail "agentctl restore: $out"; }
grep -q "restored base backup $backup_id " <<<"$out" || fail "the restore did not start from the FWAL2-era backup $backup_id: $out"
in_ct systemctl start postgresql@15-restored || fail "the restored cluster did not start"
promoted() { [ "$(psql_at $restored_port 'SELECT pg_is_in_recovery()')" = f ]; }
wal_wait_for 90 "the restored cluster never finished recovery" promoted
got=$(psql_at $restored_port "SELECT phase || '=' || count(*) FROM marks GROUP BY phase ORDER BY phase" | paste -sd' ')
[ "$got" = "$history" ] || {
    in_ct tail -n 30 /var/log/postgresql/postgresql-15-restored.log >&2 || true
    fail "restored marks: '$got', expected '$history' (FWAL2 rows, FWAL1 rows, none after the target)"
}
log "restored to the target: $got"
in_ct systemctl stop postgresql@15-restored

# --- verify: the mixed archive checks; a changed digit in either kind does not.
verify_json() { in_ct agentctl wal verify --json; }
report=$(verify_json) || { wal_journal; fail "agentctl wal verify failed on the mixed archive: $report"; }
python3 - "$report" "$start_wal" "$last_segment" <<'PY' || fail "agentctl wal verify on the mixed archive: $report"
import json, sys
d, start, last = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
assert d["ok"] is True and d["checksum_failures"] == [] and d["gaps"] == [], d
assert d["from"] == start and d["to"] >= last, d
assert d["objects_checked"] >= 4, d
PY
log "verify: ok, $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["objects_checked"])' "$report") objects, no checksum failure"
flip() { # OBJECT: changes one hex digit of its header's checksum, in place
    in_ct python3 - "$wal_dir/$1.zst" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(6)
    digit = f.read(1)
    f.seek(6)
    f.write(b"1" if digit == b"0" else b"0")
PY
}
cp_obj() { in_ct cp -p "$wal_dir/$1.zst" "/var/lib/fleet-agent-wal/$1.keep"; }
put_back() { in_ct mv "/var/lib/fleet-agent-wal/$1.keep" "$wal_dir/$1.zst"; }
for object in "$fwal2_segment" "$fwal1_segment"; do cp_obj "$object"; flip "$object"; done
report=$(verify_json) && fail "agentctl wal verify passed with two changed objects: $report"
python3 - "$report" "$fwal2_segment" "$fwal1_segment" <<'PY' || fail "agentctl wal verify did not name exactly the changed objects: $report"
import json, sys
d = json.loads(sys.argv[1])
assert d["ok"] is False, d
assert sorted(f["name"] for f in d["checksum_failures"]) == sorted(sys.argv[2:4]), d["checksum_failures"]
assert all("checksum mismatch" in f["error"] for f in d["checksum_failures"]), d["checksum_failures"]
PY
log "verify with a changed digit in $fwal2_segment (FWAL2) and $fwal1_segment (FWAL1): both named"
for object in "$fwal2_segment" "$fwal1_segment"; do put_back "$object"; done
report=$(verify_json) || fail "agentctl wal verify after putting the objects back: $report"
log "ok: FWAL2 by default, FWAL1 after object_checksum = \"sha256\", PITR and verify across both"

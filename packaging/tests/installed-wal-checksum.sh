#!/usr/bin/env bash
# As installed: the archive object formats (issue 13). In the package tests'
# systemd container, next to Debian's postgresql-15, set up as docs/wal.md
# says: the packaged WAL service (User=postgres) writes the default's format
# (`wal.object_checksum`'s default in the installed `fleet-agentd config
# reference`: xxh3, FWAL3, since 0.3.0) with object_checksum unset (the header of every
# stored object is read); then the operator sets `object_checksum = "sha256"`
# in [wal] as docs/wal.md's "Upgrading to 0.2.0" says and restarts the
# service, and every object written after that is FWAL1, its header the
# SHA-256 of the segment (decompressed with zstd and hashed here); then
# `object_checksum = "blake3"` as docs/wal.md's "Upgrading to 0.3.0" says for
# hosts with older readers (xxh3 instead, should the default be blake3, so all
# three formats are written), and every object after that is in that format;
# the FWAL3 objects start FWAL3 (`head -c 5`), their header the XXH3-128 of
# the segment (`xxhsum -H2` here). A point-in-time restore whose base backup was
# taken before the first switch replays the three kinds of segments in one
# recovery: the rows written in each phase (each only in its objects) are
# back exactly, those after the target are not. `agentctl wal verify` checks
# every object of the mixed archive with no checksum failure; one hex digit
# changed in the header of one object of each kind makes it fail naming
# exactly those three, so the ok above is not an ok that cannot fail.
#
# Deviations from the docs, forced by the test rig: the cluster listens on
# 44250 instead of 5432 (the container shares the host's network); the WAL
# service is stopped, listed and started instead of restarted, so the objects
# written before each switch are known exactly.
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
command -v xxhsum >/dev/null || fail "xxhsum is missing on the test host (Debian's xxhash)"

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
}
trap cleanup EXIT
cleanup
systemd_container_up "fleet-$PKGTEST_NAME"


wal_host_up $pg_port "$deb"

# --- Set-up, as docs/wal.md says (the port aside); object_checksum unset.
wal_agent_toml file:///var/backups/fleet-agent /var/lib/postgresql/15/main/pg_wal
# As postgres, sandboxed, without capabilities (lib.sh).
wal_service_up
wal_archiving_on 60s

# The installed default, as its reference prints it; the last phase writes the
# newer format that the default is not.
default=$(in_ct fleet-agentd config reference | sed -n 's/^| `wal.object_checksum` | `"\([a-z0-9]*\)"`.*/\1/p')
magic_of() { case $1 in sha256) echo FWAL1 ;; blake3) echo FWAL2 ;; xxh3) echo FWAL3 ;; *) fail "no format for object_checksum $1" ;; esac; }
case $default in
    blake3) last=xxh3 ;;
    xxh3) last=blake3 ;;
    *) fail "the installed reference's object_checksum default is '$default'" ;;
esac
first_magic=$(magic_of "$default")
last_magic=$(magic_of "$last")

sysid=$(in_ct od -An -t u8 -N 8 /var/lib/postgresql/15/main/global/pg_control | tr -d ' ')
wal_dir=/var/backups/fleet-agent/$sysid/wal
# NAME MAGIC for every stored WAL object, MAGIC the header's (FWAL1, FWAL2,
# FWAL3) when the object starts with one (magic, 64 lowercase hex digits for
# FWAL1/FWAL2, 32 for FWAL3, newline), else BAD. Hidden names are a directory
# target's temp files.
headers() {
    in_ct python3 - "$wal_dir" <<'PY'
import os, re, sys
d = sys.argv[1]
for n in sorted(os.listdir(d)):
    if n.startswith(".") or not n.endswith(".zst"):
        continue
    with open(os.path.join(d, n), "rb") as f:
        head = f.read(71)
    m = re.fullmatch(rb"(FWAL[12]) [0-9a-f]{64}\n", head) or re.fullmatch(rb"(FWAL3) [0-9a-f]{32}\n", head[:39])
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
# Objects in AFTER (a headers listing) that BEFORE has not.
added() { comm -13 <(sort <<<"$1") <(sort <<<"$2"); }
# After a switch to SETTING (objects BEFORE, now AFTER): sets $new to the
# objects added, failing unless there are some, all MAGIC, each SEGMENT among
# them, and every object of BEFORE still there as it was.
expect_switched() { # BEFORE AFTER SETTING MAGIC SEGMENT...
    local before=$1 after=$2 setting=$3 magic=$4 bad segment
    shift 4
    new=$(added "$before" "$after")
    [ -n "$new" ] || fail "nothing stored after object_checksum = \"$setting\""
    bad=$(grep -v " $magic\$" <<<"$new" || true)
    [ -z "$bad" ] || fail "objects written after object_checksum = \"$setting\" are not all $magic: $bad"
    for segment in "$@"; do
        grep -qx "$segment $magic" <<<"$new" || fail "$segment is not a new $magic object: $new"
    done
    [ "$(comm -23 <(sort <<<"$before") <(sort <<<"$after"))" = "" ] || fail "an object written before the switch to $setting changed"
}
# The operator's switch, as docs/wal.md says; the service stopped first by the caller.
set_checksum() { # ALGORITHM
    in_ct sed -i '/^object_checksum = /d' /etc/fleet-agent/agent.toml
    in_ct sed -i "/^pg_wal_dir = /a object_checksum = \"$1\"" /etc/fleet-agent/agent.toml
    in_ct fleet-agentd check-config >/dev/null || fail "check-config refused object_checksum = \"$1\""
    in_ct systemctl start fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not start with $1"; }
}
# Checks that OBJECT's header records ALGORITHM's digest of its decompressed
# content, computed here with zstd and sha256sum or xxhsum, and that it is a
# whole 16 MiB segment.
header_is_digest() { # OBJECT ALGORITHM
    local obj=$PKGTEST_CACHE/$PKGTEST_NAME.obj header_len digits recorded content size
    in_ct cat "$wal_dir/$1.zst" >"$obj"
    case $2 in
        sha256) header_len=71 digits=64 ;;
        xxh3) header_len=39 digits=32 ;;
    esac
    recorded=$(head -c $header_len "$obj" | cut -c7-$((6 + digits)))
    case $2 in
        sha256) content=$(tail -c +$((header_len + 1)) "$obj" | zstd -dcq | sha256sum | cut -c1-64) ;;
        xxh3) content=$(tail -c +$((header_len + 1)) "$obj" | zstd -dcq | xxhsum -H2 | cut -c1-32) ;;
    esac
    size=$(tail -c +$((header_len + 1)) "$obj" | zstd -dcq | wc -c)
    rm -f "$obj"
    [ "$recorded" = "$content" ] || fail "$1's header records $recorded, its content's $2 is $content"
    [ "$size" = 16777216 ] || fail "$1 decompresses to $size bytes, not a 16 MiB segment"
}

# --- The default (object_checksum unset), and a base backup taken under it.
log "$first_magic by default ($default): writes, a base backup, more writes"
psql_at $pg_port "CREATE TABLE marks (id serial PRIMARY KEY, phase text NOT NULL);
    INSERT INTO marks (phase) SELECT 'base' FROM generate_series(1, 1000)" >/dev/null
switched "before the base backup" >/dev/null
out=$(in_ct agentctl backup create 2>&1) || { wal_journal; fail "agentctl backup create: $out"; }
backup=$(in_ct agentctl backup list --json | python3 -c 'import json,sys; b=json.load(sys.stdin)[-1]; print(b["id"], b["start_wal"])')
read -r backup_id start_wal <<<"$backup"
# Only in WAL after the base backup, before the first switch: only in the default's objects.
psql_at $pg_port "INSERT INTO marks (phase) SELECT '$default' FROM generate_series(1, 700)" >/dev/null
first_segment=$(switched "written under $first_magic")
wal_wait_for 30 "the base backup's start segment $start_wal was not archived" stored "$start_wal"

# Every stored object so far, with the service stopped so none is added while listed.
in_ct systemctl stop fleet-agent-wal
before=$(headers)
[ -n "$before" ] || fail "no object in $wal_dir"
bad=$(grep -v " $first_magic\$" <<<"$before" || true)
[ -z "$bad" ] || fail "objects written by default are not all $first_magic: $bad"
grep -qx "$start_wal $first_magic" <<<"$before" || fail "the base backup's start segment $start_wal is not stored as $first_magic: $before"
grep -qx "$first_segment $first_magic" <<<"$before" || fail "$first_segment is not stored as $first_magic: $before"
log "$first_magic by default: $(wc -l <<<"$before") objects, backup $backup_id from $start_wal"

# --- object_checksum = "sha256": FWAL1.
log "object_checksum = \"sha256\""
set_checksum sha256
# Only in WAL after this switch, before the next: only in FWAL1 objects.
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'sha256' FROM generate_series(1, 500)" >/dev/null
fwal1_segment=$(switched "written under FWAL1")
in_ct systemctl stop fleet-agent-wal
middle=$(headers)
expect_switched "$before" "$middle" sha256 FWAL1 "$fwal1_segment"
header_is_digest "$fwal1_segment" sha256
log "after object_checksum = \"sha256\": $(wc -l <<<"$new") new objects, all FWAL1; $fwal1_segment's header is its SHA-256"

# --- object_checksum = "$last" (blake3 while the default is xxh3).
log "object_checksum = \"$last\""
set_checksum "$last"
psql_at $pg_port "INSERT INTO marks (phase) SELECT '$last' FROM generate_series(1, 400)" >/dev/null
last_phase_segment=$(switched "written under $last_magic")
psql_at $pg_port "INSERT INTO marks (phase) SELECT '$last' FROM generate_series(1, 300)" >/dev/null
history=$(psql_at $pg_port "SELECT phase || '=' || count(*) FROM marks GROUP BY phase ORDER BY phase" | paste -sd' ')
at=$(psql_at $pg_port 'SELECT now()')
sleep 1.5
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'after' FROM generate_series(1, 200)" >/dev/null
last_segment=$(switched "past the target time")
log "target time $at ($history)"

after=$(headers)
expect_switched "$middle" "$after" "$last" "$last_magic" "$last_phase_segment" "$last_segment"
# As an operator would look (docs/wal.md): the first 5 bytes name the format.
fwal3_segment=$(sed -n 's/ FWAL3$//p' <<<"$after" | tail -n 1)
[ -n "$fwal3_segment" ] || fail "no FWAL3 object in the archive: $after"
magic=$(in_ct head -c 5 "$wal_dir/$fwal3_segment.zst")
[ "$magic" = FWAL3 ] || fail "head -c 5 of $fwal3_segment is '$magic', not FWAL3"
header_is_digest "$fwal3_segment" xxh3
fwal2_segment=$(sed -n 's/ FWAL2$//p' <<<"$after" | tail -n 1)
[ -n "$fwal2_segment" ] || fail "no FWAL2 object in the archive: $after"
log "after object_checksum = \"$last\": $(wc -l <<<"$new") new objects, all $last_magic; $fwal3_segment starts FWAL3, its header is its XXH3-128"

# --- Point-in-time restore across the mixed archive, as docs/wal.md says.
log "restore to $at from backup $backup_id"
in_ct pg_createcluster 15 restored -p $restored_port >/dev/null || fail "pg_createcluster failed"
in_ct rm -r /var/lib/postgresql/15/restored
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/15/restored
out=$(in_ct agentctl restore --to /var/lib/postgresql/15/restored --target-time "$at" 2>&1) \
    || { wal_journal; fail "agentctl restore: $out"; }
grep -q "restored base backup $backup_id " <<<"$out" || fail "the restore did not start from the $first_magic-era backup $backup_id: $out"
in_ct systemctl start postgresql@15-restored || fail "the restored cluster did not start"
promoted() { [ "$(psql_at $restored_port 'SELECT pg_is_in_recovery()')" = f ]; }
wal_wait_for 90 "the restored cluster never finished recovery" promoted
got=$(psql_at $restored_port "SELECT phase || '=' || count(*) FROM marks GROUP BY phase ORDER BY phase" | paste -sd' ')
[ "$got" = "$history" ] || {
    in_ct tail -n 30 /var/log/postgresql/postgresql-15-restored.log >&2 || true
    fail "restored marks: '$got', expected '$history' ($first_magic rows, FWAL1 rows, $last_magic rows, none after the target)"
}
log "restored to the target across $first_magic, FWAL1 and $last_magic segments: $got"
in_ct systemctl stop postgresql@15-restored

# --- verify: the mixed archive checks; a changed digit in any kind does not.
verify_json() { in_ct agentctl wal verify --json; }
report=$(verify_json) || { wal_journal; fail "agentctl wal verify failed on the mixed archive: $report"; }
python3 - "$report" "$start_wal" "$last_segment" <<'PY' || fail "agentctl wal verify on the mixed archive: $report"
import json, sys
d, start, last = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
assert d["ok"] is True and d["checksum_failures"] == [] and d["gaps"] == [], d
assert d["from"] == start and d["to"] >= last, d
assert d["objects_checked"] >= 6, d
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
changed=("$fwal2_segment" "$fwal1_segment" "$fwal3_segment")
for object in "${changed[@]}"; do cp_obj "$object"; flip "$object"; done
report=$(verify_json) && fail "agentctl wal verify passed with three changed objects: $report"
python3 - "$report" "${changed[@]}" <<'PY' || fail "agentctl wal verify did not name exactly the changed objects: $report"
import json, sys
d = json.loads(sys.argv[1])
assert d["ok"] is False, d
assert sorted(f["name"] for f in d["checksum_failures"]) == sorted(sys.argv[2:5]), d["checksum_failures"]
assert all("checksum mismatch" in f["error"] for f in d["checksum_failures"]), d["checksum_failures"]
PY
log "verify with a changed digit in $fwal2_segment (FWAL2), $fwal1_segment (FWAL1) and $fwal3_segment (FWAL3): all three named"
for object in "${changed[@]}"; do put_back "$object"; done
report=$(verify_json) || fail "agentctl wal verify after putting the objects back: $report"
log "ok: $first_magic by default, FWAL1 after object_checksum = \"sha256\", $last_magic after \"$last\", PITR and verify across all three"

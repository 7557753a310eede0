#!/usr/bin/env bash
# As installed: WAL archiving next to Debian's postgresql-15 with Debian's
# defaults (peer auth, pg_wal 0700, data directory owned by postgres), under the
# packaged units and their sandboxes, set up by following docs/wal.md. In the
# package tests' systemd container: archive under pgbench (look-ahead and
# archive_command), `agentctl backup create`, a scheduled backup, `agentctl wal
# status`, fleet-agentd's /v1/wal and /metrics relaying the WAL service, a time
# as `SELECT now()` prints it (in a +05:30 session) and exact row counts, more
# writes, then restore and PITR into a new data directory, started the Debian
# way, with the counts exact; a prefetched segment handed off to `wal fetch` as
# postgres (renamed: the cache file's inode and mtime). Last, the same archive switched to S3 (moto on
# the host's loopback) with the credentials file where docs/wal.md puts it.
#
# Deviations from the docs, both forced by the test rig: the cluster listens on
# port 47570 instead of 5432 (the container shares the host's network), and
# archive_timeout is 5s and backup_interval 20s so the scenario takes a minute.
source "$(dirname "$0")/lib.sh"
# No `cmd | grep -q` below: grep -q exits at the first match, cmd may then die of
# SIGPIPE, and pipefail turns a match into a failure.

node=$PKGTEST_NAME
# (verify and the drill: no new ports; the drill's server has only a socket.)
# Ports 47570-47579: PostgreSQL 47570 (15/main) and 47576 (15/restored), the
# department pool 47571-47574, the API 47575, moto 47577. FLEET_PKGTEST_PORT_BASE
# (default 47570) moves them all, so that a run beside the suite's own can
# keep to another range.
port_base=${FLEET_PKGTEST_PORT_BASE:-47570}
pg_port=$port_base
restored_port=$((port_base + 6))
api=127.0.0.1:$((port_base + 5))
moto_port=$((port_base + 7))
moto=/opt/moto/bin/moto_server
moto_pid=""
ensure_image
deb=$(ensure_deb)

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
    [ -z "$moto_pid" ] || kill "$moto_pid" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
systemd_container_up "fleet-$PKGTEST_NAME"

journal() { in_ct journalctl -u "$1" --no-pager -n "${2:-40}" >&2 || true; }

# --- The host: Debian's cluster 15/main as the package made it, on this test's port.
wal_host_up $pg_port "$deb"

# --- Set-up, as docs/wal.md says (the port aside).
wal_agent_toml file:///var/backups/fleet-agent /var/lib/postgresql/15/main/pg_wal 'backup_interval = "20s"'
log "starting fleet-agent-wal and fleet-agentd, restarting postgresql"
# As postgres, sandboxed, with no capabilities (lib.sh); the package made the
# archive directory for it.
wal_service_up
wal_archiving_on 5s
# wal_service_up checked that the unit runs the WAL-only binary;
# `fleet-agentd wal-serve` stays, for units written before it.
in_ct fleet-agentd wal-serve --help >/dev/null || fail "fleet-agentd wal-serve is gone"
[ "$(in_ct stat -c '%U' /var/backups/fleet-agent)" = postgres ] || fail "/var/backups/fleet-agent is not owned by postgres"
in_ct runuser -u postgres -- cat /etc/fleet-agent/agent.toml >/dev/null 2>&1 && fail "postgres can read agent.toml"
# The PostgreSQL user still gets push/fetch only on fleet-agentd's socket.
if in_ct runuser -u postgres -- agentctl --socket /run/fleet-agent/agentctl.sock status >/dev/null 2>&1; then
    fail "postgres may read fleet-agentd's status"
fi
# ... and push/fetch only on the WAL service's socket, though it runs as postgres.
if out=$(in_ct runuser -u postgres -- agentctl backup prune --window 0s 2>&1); then
    fail "postgres may apply retention on the WAL socket: $out"
fi
grep -q 'push and fetch' <<<"$out" || fail "postgres's refusal does not say what it may do: $out"

# --- Archive under pgbench.
log "pgbench"
in_ct runuser -u postgres -- pgbench -h /var/run/postgresql -p $pg_port -i -s 2 -q postgres >/dev/null 2>&1 \
    || fail "pgbench -i failed"
in_ct runuser -u postgres -- pgbench -h /var/run/postgresql -p $pg_port -c 2 -T 8 postgres >/dev/null 2>&1 \
    || fail "pgbench failed"
wal_wait_for 60 "PostgreSQL archived no segment" archived 3

log "agentctl backup create"
out=$(in_ct agentctl backup create 2>&1) || { journal fleet-agent-wal; fail "agentctl backup create: $out"; }
grep -q 'base backup .* taken' <<<"$out" || fail "backup create said: $out"
backups() { in_ct agentctl backup list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }
first=$(backups)
[ "$first" -ge 1 ] || fail "no base backup listed after backup create"
log "waiting for a scheduled base backup (backup_interval 20s)"
more_backups() { [ "$(backups)" -gt "$first" ]; }
wal_wait_for 60 "no scheduled base backup came" more_backups
wal_wait_for 10 "no wal_backup_created event in fleet-agent-wal's journal" \
    in_journal 'base backup' -u fleet-agent-wal EVENT=wal_backup_created

out=$(in_ct agentctl wal status 2>&1) || fail "agentctl wal status: $out"
grep -qE 'pg_stat_archiver: +archived [1-9]' <<<"$out" || fail "wal status shows no archiver figures: $out"
grep -qE 'last base backup: +[0-9]' <<<"$out" || fail "wal status shows no last base backup: $out"
grep -q 'system identifier:  [0-9]' <<<"$out" || fail "wal status knows no system identifier: $out"
in_ct agentctl backup prune >/dev/null || fail "agentctl backup prune failed"

# fleet-agentd relays the WAL service: /v1/wal and the WAL metrics on its API.
http_get() { api_get "$api" "$1"; }
status=$(http_get /v1/wal) || fail "fleet-agentd's GET /v1/wal failed"
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["pushed_segments"] > 0, d' "$status" \
    || fail "fleet-agentd's /v1/wal does not show the WAL service's figures: $status"
relayed() { grep -qE '^fleet_agent_wal_service_up 1$' <<<"$(http_get /metrics)"; }
wal_wait_for 20 "fleet-agentd's /metrics does not relay the WAL service" relayed
grep -qE '^fleet_agent_wal_shipped_segments_total [1-9]' <<<"$(http_get /metrics)" \
    || fail "no shipped segments in fleet-agentd's /metrics"
# PostgreSQL's archiver asks as soon as a segment is done, mostly before the
# look-ahead's next scan: the service then reads the file from pg_wal itself
# (as postgres, under the unit's sandbox), and agentctl never sends content.
calls=$(grep '^fleet_agent_wal_push_calls_total' <<<"$(http_get /metrics)" || true)
grep -qE '^fleet_agent_wal_push_calls_total\{served="pg_wal"\} [1-9]' <<<"$calls" \
    || fail "no push served from pg_wal by the WAL service: $calls"
grep -qE '^fleet_agent_wal_push_calls_total\{served="content"\} 0$' <<<"$calls" \
    || fail "agentctl had to send a segment's content: $calls"
log "archive_command pushes served: $(sed -E 's/.*served="([a-z_]+)"\} /\1 /' <<<"$calls" | paste -sd, -)"
out=$(in_ct agentctl --socket /run/fleet-agent/agentctl.sock wal status 2>&1) \
    || fail "wal status through fleet-agentd's socket: $out"
grep -qE 'shipped: +[1-9]' <<<"$out" || fail "fleet-agentd's socket does not relay the WAL status: $out"

# --- A point in time, pasted the way psql prints it, and what it holds.
psql_at $pg_port "CREATE TABLE marks (id serial PRIMARY KEY, phase text NOT NULL);
    INSERT INTO marks (phase) SELECT 'before' FROM generate_series(1, 1000);" >/dev/null
history=$(psql_at $pg_port 'SELECT count(*) FROM pgbench_history')
at=$(psql_at $pg_port "SET TIME ZONE 'Asia/Kolkata'; SELECT now()")
grep -q '+05:30$' <<<"$at" || fail "expected a +05:30 time from psql, got '$at'"
log "target time $at (marks 1000, pgbench_history $history)"
sleep 1.5
psql_at $pg_port "INSERT INTO marks (phase) SELECT 'after' FROM generate_series(1, 500)" >/dev/null
in_ct runuser -u postgres -- pgbench -h /var/run/postgresql -p $pg_port -c 2 -T 3 postgres >/dev/null 2>&1 \
    || fail "second pgbench failed"
last=$(psql_at $pg_port 'SELECT pg_walfile_name(pg_current_wal_lsn())')
psql_at $pg_port 'SELECT pg_switch_wal()' >/dev/null
# Names of one timeline sort as their positions.
past_target() { [[ ! "$(psql_at $pg_port 'SELECT last_archived_wal FROM pg_stat_archiver')" < "$last" ]]; }
wal_wait_for 60 "the WAL past the target time was not archived" past_target

# --- Restore, word for word as docs/wal.md says (the port aside).
log "restore to $at"
# Debian's configuration for a second cluster; its freshly made data
# directory is replaced by the restore.
in_ct pg_createcluster 15 restored -p $restored_port >/dev/null || fail "pg_createcluster failed"
in_ct rm -r /var/lib/postgresql/15/restored
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/15/restored
out=$(in_ct agentctl restore --to /var/lib/postgresql/15/restored --target-time "$at" 2>&1) \
    || { journal fleet-agent-wal; fail "agentctl restore: $out"; }
log "$out"
[ "$(in_ct stat -c '%a %U' /var/lib/postgresql/15/restored)" = "700 postgres" ] || fail "restored directory is not 0700 postgres"
in_ct test -f /var/lib/postgresql/15/restored/recovery.signal || fail "no recovery.signal"
in_ct systemctl start postgresql@15-restored || { journal postgresql@15-restored; fail "the restored cluster did not start"; }
promoted() { [ "$(psql_at $restored_port 'SELECT pg_is_in_recovery()')" = f ]; }
wal_wait_for 90 "the restored cluster never finished recovery" promoted
got=$(psql_at $restored_port "SELECT phase || '=' || count(*) FROM marks GROUP BY phase ORDER BY phase")
[ "$got" = "before=1000" ] || { in_ct tail -n 30 /var/log/postgresql/postgresql-15-restored.log >&2 || true; fail "restored marks: '$got', expected before=1000 only"; }
got=$(psql_at $restored_port 'SELECT count(*) FROM pgbench_history')
[ "$got" = "$history" ] || fail "restored pgbench_history has $got rows, expected $history"
in_ct grep -q "fleet-agent-wal/wal.sock wal fetch" /var/lib/postgresql/15/restored/postgresql.auto.conf \
    || fail "restore_command does not use the WAL service's socket"

# --- The hand-off as installed: a prefetched segment reaches restore_command's
# destination by a rename (agentctl, as postgres, outside the WAL service's
# sandbox), so the destination IS the prefetched file, complete.
sysid=$(in_ct od -An -t u8 -N 8 /var/lib/postgresql/15/main/global/pg_control | tr -d ' ')
mapfile -t archived < <(in_ct ls "/var/backups/fleet-agent/$sysid/wal" | sed -n 's/^\([0-9A-F]\{24\}\)\.zst$/\1/p' | sort)
first=""
for ((i = 0; i + 1 < ${#archived[@]}; i++)); do
    n=${archived[i]}
    next=$(printf '%s%08X%08X' "${n:0:8}" $((16#${n:8:8})) $((16#${n:16:8} + 1)))
    [ "${archived[i + 1]}" = "$next" ] && { first=$n; break; }
done
[ -n "$first" ] || fail "no two consecutive segments archived: ${archived[*]}"
fetch_as_pg() { in_ct runuser -u postgres -- sh -c "cd /var/lib/postgresql/15/main && agentctl wal fetch $1 /var/lib/postgresql/handoff/$2"; }
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/handoff
fetch_as_pg "$first" A || fail "wal fetch $first as postgres"
cached=/var/lib/fleet-agent-wal/wal-prefetch/$sysid/$next
prefetched() { in_ct test -f "$cached"; }
wal_wait_for 30 "$next was not prefetched after $first was fetched" prefetched
# A mark a rename keeps and a new file does not have: an inode number alone is
# no proof, the file system hands a freed one straight out again.
in_ct touch -m -d @1000000000 "$cached"
inode=$(in_ct stat -c %i "$cached")
fetch_as_pg "$next" B || fail "wal fetch $next (prefetched) as postgres"
[ "$(in_ct stat -c '%i %Y %s %U' /var/lib/postgresql/handoff/B)" = "$inode 1000000000 16777216 postgres" ] \
    || fail "the prefetched $next was not handed off: $(in_ct stat -c '%i %Y %s %U' /var/lib/postgresql/handoff/B), cache inode $inode, mtime 1000000000"
in_ct test ! -e "$cached" || fail "the handed-off segment is still in the cache"
log "hand-off as installed: $next renamed from the prefetch cache (inode $inode)"
in_ct rm -r /var/lib/postgresql/handoff
# The hand-off counts as a prefetch hit, seen on fleet-agentd's /metrics (relayed every 5 s).
hit_counted() { grep -qE '^fleet_agent_wal_prefetch_hits_total [1-9]' <<<"$(http_get /metrics)"; }
wal_wait_for 20 "fleet-agentd's /metrics counts no prefetch hit after the hand-off" hit_counted

# --- verify and the restore drill, run by the WAL service (User=postgres) as
# docs/wal.md says: the whole chain checks, and a drill restores the newest
# backup into /var/lib/fleet-agent-wal/wal-drill, replays, answers a query.
log "agentctl wal verify"
out=$(in_ct agentctl wal verify 2>&1) || { journal fleet-agent-wal; fail "agentctl wal verify: $out"; }
grep -q 'result: *ok' <<<"$out" || fail "wal verify said: $out"
log "agentctl wal drill"
out=$(in_ct agentctl wal drill --json 2>&1) || { journal fleet-agent-wal; fail "agentctl wal drill: $out"; }
# At or past the end: the archive may grow while the drill runs (the cluster
# restored above is on timeline 2 and archives into it too).
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["ok"] and d["rto_seconds"] > 0 and d["replayed_to"][8:] >= d["expected_end"][8:], d' "$out" \
    || fail "the drill report is not a success: $out"
log "drill RTO $(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["rto_seconds"], 1))' "$out") s"
[ -z "$(in_ct ls -A /var/lib/fleet-agent-wal/wal-drill)" ] || fail "the drill left its scratch directory behind"
# fleet-agentd relays the WAL service's metrics every 5 s.
drill_relayed() { m=$(http_get /metrics) && grep -qE '^fleet_agent_wal_drill_ok 1$' <<<"$m" && grep -qE '^fleet_agent_wal_verify_ok 1$' <<<"$m"; }
wal_wait_for 20 "fleet-agentd's /metrics shows no fleet_agent_wal_drill_ok 1 / verify_ok 1" drill_relayed
wal_wait_for 10 "no wal_drill_ok event in the WAL unit's journal" in_journal . -u fleet-agent-wal EVENT=wal_drill_ok -q

# --- The same archive on S3, credentials where docs/wal.md keeps them (only
# root can read them; the unit hands the WAL service its copy).
log "switching the target to S3 (moto on 127.0.0.1:$moto_port)"
[ -x "$moto" ] || fail "$moto is missing; run scripts/test.sh (it installs moto) first"
"$moto" -H 127.0.0.1 -p "$moto_port" >/dev/null 2>&1 &
moto_pid=$!
moto_up() { python3 -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$moto_port/pg-archive', method='PUT'), timeout=2)"; }
wal_wait_for 60 "moto did not come up on $moto_port" moto_up
in_ct sh -c 'umask 077; printf "access_key_id = test\nsecret_access_key = test\n" >/etc/fleet-agent/s3-credentials'
in_ct tee -a /etc/fleet-agent/agent.toml >/dev/null <<TOML
[wal.s3]
endpoint = "http://127.0.0.1:$moto_port"
region = "us-east-1"
credentials_file = "/etc/fleet-agent/s3-credentials"
TOML
in_ct sed -i 's|^target = "file:///var/backups/fleet-agent"|target = "s3://pg-archive/app-1"|' /etc/fleet-agent/agent.toml
in_ct fleet-agentd check-config >/dev/null || fail "check-config refused the S3 [wal]"
in_ct runuser -u postgres -- cat /etc/fleet-agent/s3-credentials >/dev/null 2>&1 && fail "postgres can read the S3 credentials"
in_ct systemctl restart fleet-agent-wal || { journal fleet-agent-wal; fail "fleet-agent-wal did not start on S3"; }
out=$(in_ct agentctl wal status 2>&1) || fail "wal status on S3: $out"
grep -q 'target: *s3://pg-archive/app-1' <<<"$out" || fail "wal status does not show the S3 target: $out"
out=$(in_ct agentctl backup create 2>&1) || { journal fleet-agent-wal; fail "backup create to S3: $out"; }
before=$(archived_count)
failed=$(psql_at $pg_port 'SELECT failed_count FROM pg_stat_archiver')
psql_at $pg_port "INSERT INTO marks (phase) SELECT 's3' FROM generate_series(1, 100); SELECT pg_switch_wal()" >/dev/null
wal_wait_for 30 "nothing archived to S3" archived $((before + 1))
shipped() { in_ct agentctl wal status --json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["pushed_segments"] > 0 else 1)'; }
wal_wait_for 30 "the WAL service shipped nothing to S3" shipped
[ "$(psql_at $pg_port 'SELECT failed_count FROM pg_stat_archiver')" = "$failed" ] \
    || { journal fleet-agent-wal; fail "archive_command failed against S3"; }
[ "$(in_ct agentctl backup list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 1 ] \
    || fail "no base backup listed on S3"

out=$(in_ct systemd-analyze security --threshold=20 fleet-agent-wal.service 2>&1) \
    || fail "exposure of fleet-agent-wal.service above 2.0:
$out"
log "ok: fleet-agent-wal $(grep -o 'Overall exposure level.*' <<<"$out")"

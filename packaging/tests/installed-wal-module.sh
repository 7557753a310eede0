#!/usr/bin/env bash
# As installed: PostgreSQL 15 archiving through the package's archive module
# (archive_library = '/usr/lib/fleet-agent/postgresql/15/fleet_archive', no
# archive_command), as docs/wal.md "archive_library instead of archive_command"
# says, with fleet-agentd and the WAL service under their packaged units
# (service users, sandbox). Proves: switched segments reach the target with
# pg_stat_archiver's failed_count 0, the WAL service counts the module's pushes
# (fleet_agent_wal_push_calls_total on fleet-agentd's /metrics), `agentctl wal
# fetch` of an archived segment equals the original and a restore replays the
# archive to the last row; the fallback (a WAL
# service whose pg_wal_dir is an empty directory cannot answer by identity, so
# the module sends the content: served="content" counts it and the object is
# there); `agentctl wal status` and `agentctl doctor` say PostgreSQL archives
# through the module, warn when archive_command is set beside it and fail on
# archive_command without %p, which fleet_agent_wal_archiving_problems on
# fleet-agentd's /metrics counts too; and a wrong fleet_archive.socket makes the
# archiver log the module's WARNING naming that socket, then archiving resumes
# once it is right again.
#
# Deviations from the docs, forced by the test rig: the cluster listens on
# 48700 (the container shares the host's network); wal_keep_size keeps the
# switched segments in pg_wal so the fetched copies can be compared with them.
source "$(dirname "$0")/lib.sh"
# No `cmd | grep -q` below (SIGPIPE under pipefail); here-strings instead.

node=$PKGTEST_NAME
# Ports 48700-48709: PostgreSQL 48700 (15/main) and 48706 (15/restored), the
# department pool 48701-48704, the API 48705.
port_base=48700
pg_port=$port_base
restored_port=$((port_base + 6))
api=127.0.0.1:$((port_base + 5))
module=/usr/lib/fleet-agent/postgresql/15/fleet_archive
pg_log=/var/log/postgresql/postgresql-15-main.log
ensure_image
deb=$(ensure_deb)

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
}
trap cleanup EXIT
cleanup
systemd_container_up "fleet-$PKGTEST_NAME"

wal_host_up $pg_port "$deb"
in_ct test -f "$module.so" || fail "the package did not install $module.so"

write_agent_toml() { wal_agent_toml file:///var/backups/fleet-agent "$1"; } # PG_WAL_DIR
write_agent_toml /var/lib/postgresql/15/main/pg_wal
wal_service_up

# --- Step 3 of docs/wal.md, the archive_library way: the module, no archive_command.
log "PostgreSQL archiving through $module"
in_ct tee -a /etc/postgresql/15/main/postgresql.conf >/dev/null <<CONF
wal_level = replica
archive_mode = on
archive_library = '$module'
archive_timeout = 60s
wal_keep_size = 1GB
CONF
in_ct systemctl restart postgresql || { in_ct tail -n 30 "$pg_log" >&2; fail "postgresql did not restart"; }
[ "$(psql_at $pg_port 'SHOW archive_library')" = "$module" ] || fail "archive_library is not the module"
[ -z "$(psql_at $pg_port 'SHOW archive_command')" ] || fail "archive_command is set beside archive_library"

failed_count() { psql_at $pg_port 'SELECT failed_count FROM pg_stat_archiver'; }
# switch: writes a little, switches, prints the name of the segment switched from.
switch() {
    psql_at $pg_port "INSERT INTO marks SELECT generate_series(1, 1000)" >/dev/null
    psql_at $pg_port 'SELECT pg_walfile_name(pg_switch_wal())'
}
http_get() { api_get "$api" "$1"; }
value_of() { # SERIES (an ERE): its value on fleet-agentd's /metrics (the WAL service's, relayed)
    sed -nE "s/^$1 ([0-9]+)$/\1/p" <<<"$(http_get /metrics)"
}
served() { value_of "fleet_agent_wal_push_calls_total\\{served=\"$1\"\\}"; } # KIND: pushes KIND served
sysid=$(in_ct od -An -t u8 -N 8 /var/lib/postgresql/15/main/global/pg_control | tr -d ' ')
object() { in_ct sh -c "ls /var/backups/fleet-agent/$sysid/wal/$1.*"; }
# fetched_equals NAME: agentctl wal fetch (as restore_command runs it, as
# postgres in the data directory) gives back the bytes still in pg_wal.
fetched_equals() {
    in_ct runuser -u postgres -- sh -c "cd /var/lib/postgresql/15/main && agentctl wal fetch $1 /tmp/fetched-$1" \
        || fail "agentctl wal fetch $1"
    in_ct cmp "/tmp/fetched-$1" "/var/lib/postgresql/15/main/pg_wal/$1" \
        || fail "the fetched $1 differs from the original"
    in_ct rm -f "/tmp/fetched-$1"
}

# --- A base backup (its backup history file goes through the module too),
# then segments switched by hand reach the target, none fails.
psql_at $pg_port "CREATE TABLE marks (n int)" >/dev/null
out=$(in_ct agentctl backup create 2>&1) || { wal_journal; fail "agentctl backup create: $out"; }
start=$(archived_count)
names=()
for _ in 1 2 3; do names+=("$(switch)"); done
wal_wait_for 60 "PostgreSQL archived fewer than 3 segments through the module" archived $((start + 3))
[ "$(failed_count)" = 0 ] || { in_ct tail -n 30 "$pg_log" >&2; fail "pg_stat_archiver counts failures: $(failed_count)"; }
for n in "${names[@]}"; do object "$n" >/dev/null || fail "$n is not in the archive"; done
counted() {
    local total=0 kind v
    for kind in look_ahead pg_wal content; do
        v=$(served $kind); total=$((total + ${v:-0}))
    done
    [ "$total" -ge 3 ]
}
wal_wait_for 20 "fleet-agentd's /metrics counts fewer than 3 pushes: $(grep push_calls <<<"$(http_get /metrics)" || true)" counted
log "module pushes served: $(grep '^fleet_agent_wal_push_calls_total' <<<"$(http_get /metrics)" | sed -E 's/.*served="([a-z_]+)"\} /\1 /' | paste -sd, -)"
fetched_equals "${names[2]}"

# --- How PostgreSQL archives, as `agentctl wal status` and `agentctl doctor`
# tell it: the module as documented passes; archive_command beside it is a
# trap (16 archives nothing with both set); archive_command without %p archives
# nothing. PostgreSQL's settings are read at most every 5 s (ARCHIVER_TTL),
# hence the polling. doctor exits non-zero for checks this container cannot
# pass (clock sync): only its "pg archiving" line is judged.
pg_archiving() { in_ct agentctl doctor 2>&1 | grep -E '^[a-zA-Z]+ +pg archiving ' || true; }
doctor_says() { grep -qE "$1" <<<"$(pg_archiving)"; }
status_out=$(in_ct agentctl wal status) || fail "agentctl wal status"
grep -qxF "archiving via:      archive_library $module (PostgreSQL 15)" <<<"$status_out" \
    || fail "wal status does not say PostgreSQL archives through the module: $status_out"
if grep -qE '^  (PROBLEM|warning|hint):' <<<"$status_out"; then fail "wal status finds fault with the documented set-up: $status_out"; fi
json_via=$(in_ct agentctl wal status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["archiving"]["via"])')
[ "$json_via" = archive_library ] || fail "wal status --json: archiving.via is $json_via"
doctor_says "^ok +pg archiving +PostgreSQL archives through archive_library $module \(PostgreSQL 15\)$" \
    || fail "doctor's pg archiving check: $(pg_archiving)"
conf=/etc/postgresql/15/main/postgresql.conf
set_archiving() { # LINES: replace the case's block at the end of postgresql.conf, reload
    in_ct sed -i '/^# pg-archiving case$/,$d' "$conf"
    [ -z "$1" ] || in_ct tee -a "$conf" >/dev/null <<<"# pg-archiving case
$1"
    in_ct systemctl reload postgresql || fail "postgresql did not reload"
}
set_archiving "archive_command = 'agentctl wal push %p'"
wal_wait_for 20 "doctor does not warn of archive_command beside archive_library: $(pg_archiving)" \
    doctor_says '^warn +pg archiving .*warning: archive_command is set but ignored while archive_library is set'
log "doctor: $(pg_archiving)"
# From here on, each wait on /metrics comes before any status or doctor call,
# so what it sees was read by the WAL service's schedule (every 10 s), with
# no one asking: fleet_agent_wal_archiving_problems (FleetWalArchivingBroken).
problems_metric() { value_of fleet_agent_wal_archiving_problems; }
problems_are() { [ "$(problems_metric)" = "$1" ]; }
set_archiving "archive_library = ''
archive_command = 'agentctl wal push'"
wal_wait_for 30 "fleet-agentd's /metrics does not count the problem: $(problems_metric)" problems_are 1
doctor_says "^FAIL +pg archiving +PostgreSQL archives through archive_command 'agentctl wal push' \(PostgreSQL 15\); PROBLEM: archive_command runs agentctl wal push without %p" \
    || fail "doctor does not fail archive_command without %p: $(pg_archiving)"
if in_ct agentctl doctor >/dev/null 2>&1; then fail "agentctl doctor exits 0 with archive_command lacking %p"; fi
grep -qF "PROBLEM: archive_command runs agentctl wal push without %p" <<<"$(in_ct agentctl wal status)" \
    || fail "wal status does not show the problem"
log "doctor: $(pg_archiving)"
set_archiving ""
wal_wait_for 30 "fleet-agentd's /metrics still counts a problem: $(problems_metric)" problems_are 0
doctor_says '^ok +pg archiving ' || fail "doctor does not pass the module once set back: $(pg_archiving)"

# --- The fallback: a WAL service that can read nothing in its pg_wal_dir
# (an empty directory) answers the identity question with 412; the module then
# sends the content. (The prototype, without fallback, failed here.)
log "fallback: pg_wal_dir an empty directory, the module sends the content"
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/empty-pg_wal
write_agent_toml /var/lib/postgresql/empty-pg_wal
in_ct fleet-agentd check-config >/dev/null || fail "check-config refused the [wal] with an empty pg_wal_dir"
in_ct systemctl restart fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not restart"; }
content_before=$(served content)
content_before=${content_before:-0}
failed=$(failed_count)
done_before=$(archived_count)
sent=$(switch)
wal_wait_for 60 "$sent was not archived with the identity question refused" archived $((done_before + 1))
[ "$(failed_count)" = "$failed" ] || { in_ct tail -n 30 "$pg_log" >&2; fail "the fallback failed segments (failed_count $failed -> $(failed_count))"; }
object "$sent" >/dev/null || fail "$sent is not in the archive after the fallback"
sent_content() { [ "$(served content)" -ge $((content_before + 1)) ]; }
wal_wait_for 20 "fleet-agentd's /metrics counts no push served by content" sent_content
fetched_equals "$sent"
log "fallback: $sent sent as content (served=\"content\" $(served content))"
write_agent_toml /var/lib/postgresql/15/main/pg_wal
in_ct systemctl restart fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not restart"; }
failed=$(failed_count)

# --- A wrong socket: the archiver logs the module's WARNING naming it, counts
# failures, and archives again once the socket is right.
log "a wrong fleet_archive.socket"
wrong=/run/fleet-agent-wal/nowhere.sock
in_ct tee -a /etc/postgresql/15/main/postgresql.conf >/dev/null <<<"fleet_archive.socket = '$wrong'"
in_ct systemctl reload postgresql || fail "postgresql did not reload"
done_before=$(archived_count)
stuck=$(switch)
warned() { in_ct grep -q "WARNING:  fleet_archive: $stuck: cannot ask the WAL service at $wrong" "$pg_log"; }
wal_wait_for 60 "no WARNING naming $wrong in $pg_log" warned
[ "$(failed_count)" -gt "$failed" ] || fail "the wrong socket counted no failure"
in_ct grep "fleet_archive: $stuck" "$pg_log" | head -n 1 >&2
in_ct sed -i '/^fleet_archive.socket = /d' /etc/postgresql/15/main/postgresql.conf
in_ct systemctl reload postgresql || fail "postgresql did not reload"
# The archiver waits up to a minute after three failures; the reload wakes it.
wal_wait_for 90 "$stuck was not archived after the socket was set right" archived $((done_before + 1))
object "$stuck" >/dev/null || fail "$stuck is not in the archive"

# --- A restore replays what the module archived: every row written before
# the last switch (the restore_command agentctl restore writes fetches them).
rows=$(psql_at $pg_port 'SELECT count(*) FROM marks')
log "restore of the module's archive ($rows rows)"
in_ct pg_createcluster 15 restored -p $restored_port >/dev/null || fail "pg_createcluster failed"
in_ct rm -r /var/lib/postgresql/15/restored
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/15/restored
out=$(in_ct agentctl restore --to /var/lib/postgresql/15/restored 2>&1) || { wal_journal; fail "agentctl restore: $out"; }
in_ct systemctl start postgresql@15-restored || { in_ct tail -n 30 /var/log/postgresql/postgresql-15-restored.log >&2; fail "the restored cluster did not start"; }
promoted() { [ "$(psql_at $restored_port 'SELECT pg_is_in_recovery()')" = f ]; }
wal_wait_for 90 "the restored cluster never finished recovery" promoted
got=$(psql_at $restored_port 'SELECT count(*) FROM marks')
[ "$got" = "$rows" ] || { in_ct tail -n 30 /var/log/postgresql/postgresql-15-restored.log >&2; fail "the restored marks has $got rows, expected $rows"; }
log "ok: archive_library pushes, fallback by content, the wrong socket named, restore replays $got rows"

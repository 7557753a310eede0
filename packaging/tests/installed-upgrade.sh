#!/usr/bin/env bash
# A package upgrade as installed (issue 14): the .deb in a systemd container,
# the daemon as fleet-agent under the shipped unit with one department running
# and one stopped by the operator (a stop is intent that only state.db holds).
# Its state.db is then put in the form the previous build left it (schema
# version 0: the same tables, no schema_migrations, user_version 0), and the
# next .deb is installed the way an operator does, maintainer scripts and all
# while the daemon runs, so the maintainer scripts restart it (both test
# packages carry this checkout's binary; the running process migrated the file
# at its start and does not read the version again).
# The restarted daemon must migrate the file (and say so), keep a copy of it,
# keep the running department's container and port, and leave the stopped one
# stopped.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
run=$PKGTEST_NAME-a
held=$PKGTEST_NAME-b
# Ports 47702-47706 (the pool) and 47709 (the API).
image=fleet-test-agent:1
installed_node_up "$node"
deb_new=$(ensure_deb "$PKGTEST_DEB_VERSION_NEW")
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47702-47706"
bind = "127.0.0.1"
[api]
listen = "127.0.0.1:47709"
TOML
for d in "$run" "$held"; do
    in_ct tee "/etc/fleet-agent/departments.d/$d.toml" >/dev/null <<TOML
id = "$d"
image = "$image"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
done

state_of() { # id -> its state in agentctl status, or nothing
    local out; out=$(in_ct agentctl status --json 2>/dev/null) || return 0
    python3 -c '
import json, sys
for d in json.loads(sys.argv[1]).get("departments", []):
    if d.get("id") == sys.argv[2]:
        print(d.get("state"), d.get("health"))' "$out" "$1"
}
wait_state() { # id "state[ health]" what
    for _ in $(seq 1 90); do
        [[ "$(state_of "$1")" == "$2"* ]] && return 0
        sleep 1
    done
    in_ct agentctl status >&2 || true
    fail "$1 is '$(state_of "$1")', not '$2': $3"
}

in_ct systemctl start fleet-agentd.service || fail "fleet-agentd did not start"
wait_state "$run" "running healthy" "after the first start"
wait_state "$held" "running healthy" "after the first start"
in_ct agentctl stop "$held" >/dev/null || fail "agentctl stop $held failed"
wait_state "$held" "stopped" "after agentctl stop"
id_before=$(docker inspect -f '{{ .Id }}' "aio-$run")
port_before=$(docker port "aio-$run" 8080/tcp)
log "aio-$run is ${id_before:0:12} on $port_before; $held stopped"

# The daemon keeps running: the upgrade goes through the maintainer scripts'
# restart path. The file is put back to version 0 under it (the running
# process migrated it at its start and does not look at the version again).
log "state.db as the previous build left it (schema version 0), daemon running"
pid_before=$(in_ct systemctl show -p MainPID --value fleet-agentd)
in_ct runuser -u fleet-agent -- python3 -c '
import sqlite3
c = sqlite3.connect("/var/lib/fleet-agent/state.db")
c.execute("DROP TABLE schema_migrations")
c.execute("PRAGMA user_version = 0")
c.commit()
c.close()'
[ "$(in_ct runuser -u fleet-agent -- python3 -c 'import sqlite3; print(sqlite3.connect("/var/lib/fleet-agent/state.db").execute("PRAGMA user_version").fetchone()[0])')" = 0 ] \
    || fail "could not turn state.db into schema version 0"

log "upgrade to $PKGTEST_DEB_VERSION_NEW with apt"
since=$(in_ct date +%s)
in_ct sh -c 'cat >/tmp/new.deb' <"$deb_new"
in_ct env DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/new.deb </dev/null >/dev/null 2>&1 \
    || fail "the upgrade failed"
[ "$(in_ct dpkg-query -W -f '${Version}' fleet-agent)" = "$PKGTEST_DEB_VERSION_NEW" ] || fail "the upgrade did not happen"
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "fleet-agentd is not running after the upgrade"
[ "$(in_ct systemctl show -p ActiveEnterTimestampMonotonic --value fleet-agentd)" != 0 ] || fail "no start recorded"
[ "$(in_ct systemctl show -p MainPID --value fleet-agentd)" != "$pid_before" ] || fail "the upgrade did not restart the running daemon"
migrated() { in_journal 'state.db schema migrated' -u fleet-agentd --since "@$since"; }
until_ok 10 "the restarted daemon did not migrate state.db" migrated
wait_state "$run" "running healthy" "after the upgrade"
[ "$(docker inspect -f '{{ .Id }}' "aio-$run")" = "$id_before" ] || fail "the upgrade replaced aio-$run"
[ "$(docker port "aio-$run" 8080/tcp)" = "$port_before" ] || fail "the upgrade moved aio-$run from $port_before"
sleep 3 # resyncs: a lost stop would show as a start by now
[ "$(state_of "$held" | cut -d' ' -f1)" = stopped ] || fail "the upgrade lost the operator's stop of $held: $(state_of "$held")"
state=$(in_ct runuser -u fleet-agent -- fleet-agentd state) || fail "fleet-agentd state fails after the upgrade"
grep -qE '^schema: version ([0-9]+) \(this binary knows up to \1\)$' <<<"$state" || fail "not at the newest schema:
$state"
grep -q "^department: $held $image stopped$" <<<"$state" || fail "state.db lost $held's stop:
$state"
in_ct test -f /var/lib/fleet-agent/state.db.schema-v0 || fail "no copy of state.db from before the migration"
log "ok: state.db migrated from version 0 on upgrade; aio-$run kept ${id_before:0:12} on $port_before, $held still stopped"

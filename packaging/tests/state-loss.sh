#!/usr/bin/env bash
# State loss as installed (issue 12): the .deb in a systemd container, the
# daemon as fleet-agent under the full sandbox, one department running. The
# daemon is killed with SIGKILL and its store destroyed (garbage over
# state.db and its WAL, then, the second time, state.db deleted); after
# `systemctl start` the department must run on the SAME container and the
# SAME port, the unreadable file must be kept beside the new one, and the
# loss must be said in the STATUS line and by `agentctl doctor`. A second
# department crash-loops and is parked before the loss: it must come back
# parked, with its restart count, and not be started again (the history is
# rebuilt from Docker's events, not from the lost store).
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
dept=$PKGTEST_NAME-a
crash=$PKGTEST_NAME-c
# Ports 47550-47559 (the pool, then the API).
api=127.0.0.1:47559
image=fleet-test-agent:1
installed_node_up "$node"
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47550-47554"
bind = "127.0.0.1"
[api]
listen = "$api"
TOML
in_ct tee "/etc/fleet-agent/departments.d/$dept.toml" >/dev/null <<TOML
id = "$dept"
image = "$image"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
[secrets]
API_KEY = "canary-state-loss"
TOML
in_ct tee "/etc/fleet-agent/departments.d/$crash.toml" >/dev/null <<TOML
id = "$crash"
image = "$image"
[env]
CRASH_AFTER = "1s"
EXIT_CODE = "3"
[health]
enabled = false
[restart]
max_retries = 2
backoff = "1s"
window = "10m"
TOML

wait_healthy() {
    for _ in $(seq 1 90); do
        if out=$(in_ct agentctl status --json 2>/dev/null) && python3 -c '
import json, sys
doc = json.loads(sys.argv[1])
ok = any(d.get("id") == sys.argv[2] and d.get("state") == "running" and d.get("health") == "healthy"
         for d in doc.get("departments", []))
sys.exit(0 if ok else 1)' "$out" "$dept" 2>/dev/null; then
            return 0
        fi
        sleep 1
    done
    in_ct agentctl status >&2 || true
    in_ct journalctl -u fleet-agentd --no-pager -n 40 >&2 || true
    fail "department $dept is not running healthy: $1"
}

# Waits until $crash is parked; prints its restart count.
parked_restarts() {
    for _ in $(seq 1 90); do
        if out=$(in_ct agentctl status --json 2>/dev/null) && n=$(python3 -c '
import json, sys
doc = json.loads(sys.argv[1])
rows = [d for d in doc.get("departments", []) if d.get("id") == sys.argv[2] and d.get("state") == "crash_looping"]
sys.exit(1) if not rows else print(rows[0].get("restarts"))' "$out" "$crash" 2>/dev/null); then
            echo "$n"
            return 0
        fi
        sleep 1
    done
    in_ct agentctl status >&2 || true
    fail "department $crash is not parked as crash_looping: $1"
}

published_port() {
    docker inspect -f '{{ range $p, $b := .NetworkSettings.Ports }}{{ range $b }}{{ .HostPort }}{{ end }}{{ end }}' "aio-$dept"
}

in_ct systemctl start fleet-agentd.service || fail "fleet-agentd did not start"
wait_healthy "after the first start"
id_before=$(docker inspect -f '{{ .Id }}' "aio-$dept")
port_before=$(published_port)
log "aio-$dept is ${id_before:0:12} on port $port_before"
grep -q canary-state-loss <<<"$(docker inspect -f '{{ json .Config.Labels }}' "aio-$dept")" \
    && fail "a secret value reached a container label"
restarts_before=$(parked_restarts "after the first start")
[ "$restarts_before" = 2 ] || fail "$crash parked after $restarts_before restarts, not 2"
crash_started=$(docker inspect -f '{{ .State.StartedAt }}' "aio-$crash")

for loss in garbage deleted; do
    log "kill -9, then $loss state.db, then start"
    in_ct systemctl kill -s KILL fleet-agentd.service
    # Hold off Restart=on-failure until the store is destroyed.
    in_ct systemctl stop fleet-agentd.service || true
    in_ct test -f /var/lib/fleet-agent/state.db || fail "no state.db to destroy"
    case $loss in
        garbage)
            in_ct sh -c 'cd /var/lib/fleet-agent && for f in state.db state.db-wal; do
                [ -e "$f" ] && head -c 16384 /dev/urandom >"$f"; done; true' ;;
        deleted)
            in_ct sh -c 'rm -f /var/lib/fleet-agent/state.db /var/lib/fleet-agent/state.db-wal /var/lib/fleet-agent/state.db-shm' ;;
    esac
    in_ct systemctl start fleet-agentd.service || {
        in_ct journalctl -u fleet-agentd --no-pager -n 40 >&2 || true
        fail "fleet-agentd did not start after $loss state.db"
    }
    wait_healthy "after $loss state.db"
    [ "$(docker inspect -f '{{ .Id }}' "aio-$dept")" = "$id_before" ] \
        || fail "$loss state.db: aio-$dept was replaced"
    [ "$(published_port)" = "$port_before" ] || fail "$loss state.db: the port moved from $port_before to $(published_port)"
    status=$(in_ct systemctl show -p StatusText --value fleet-agentd)
    case $loss in
        garbage) want="unreadable" ;;
        deleted) want="missing" ;;
    esac
    grep -q "state.db was $want" <<<"$status" || fail "STATUS does not say state.db was $want: $status"
    doctor=$(in_ct agentctl doctor 2>&1) && fail "doctor passes after $loss state.db:
$doctor"
    grep -q "state.db was $want" <<<"$doctor" || fail "doctor does not name the $loss state.db:
$doctor"
    [ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "not active after $loss state.db"
    restarts=$(parked_restarts "after $loss state.db")
    [ "$restarts" = "$restarts_before" ] \
        || fail "$loss state.db: $crash shows $restarts restarts, not $restarts_before"
    sleep 3
    [ "$(docker inspect -f '{{ .State.StartedAt }}' "aio-$crash")" = "$crash_started" ] \
        || fail "$loss state.db: the parked crash loop $crash was started again"
done
in_ct sh -c 'ls /var/lib/fleet-agent/state.db.corrupt-* >/dev/null' || fail "the unreadable state.db was not kept"
in_ct test -f /var/lib/fleet-agent/state.db || fail "no new state.db"
log "ok: same container ${id_before:0:12}, same port $port_before after garbage and after deletion; $crash still parked after $restarts_before restarts"

#!/usr/bin/env bash
# Delete during a failing update, under the watchdog, as installed (issue 12's
# original symptom: systemd killed the daemon after WatchdogSec while
# `agentctl delete` waited on a department task under the registry lock).
# WatchdogSec=15s by a drop-in; a department is applied, then updated to a
# spec that never turns healthy with an update_deadline (40s) longer than
# WatchdogSec; during the proof `agentctl delete` (the old container ignores
# SIGTERM, stop_timeout 8s) must finish within its stop timeout, an apply of
# the same id meanwhile is refused as "being deleted", the department goes,
# and MainPID and NRestarts stay the same for more than 2x WatchdogSec with no
# watchdog timeout in the journal.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
dept=$PKGTEST_NAME-u
# Ports 44110-44119 (the pool, then the API).
api=127.0.0.1:44119
image=fleet-test-agent:1
installed_node_up "$node"
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
resync_interval = "2s"
[ports]
range = "44110-44114"
bind = "127.0.0.1"
[api]
listen = "$api"
TOML
in_ct mkdir -p /etc/systemd/system/fleet-agentd.service.d
in_ct tee /etc/systemd/system/fleet-agentd.service.d/watchdog.conf >/dev/null <<'UNIT'
[Service]
WatchdogSec=15s
UNIT
in_ct systemctl daemon-reload
spec() {
    cat <<TOML
id = "$dept"
image = "$image"
[env]
IGNORE_SIGTERM = "1"
$1
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
[restart]
stop_timeout = "8s"
update_deadline = "40s"
TOML
}
spec "" | in_ct tee /root/v1.toml >/dev/null
spec 'NEVER_HEALTHY = "1"' | in_ct tee /root/v2.toml >/dev/null

state_of() {
    in_ct agentctl status --json 2>/dev/null | python3 -c '
import json, sys
rows = [d for d in json.load(sys.stdin).get("departments", []) if d.get("id") == sys.argv[1]]
print(rows[0].get("state") + "/" + str(rows[0].get("health")) if rows else "absent")' "$dept"
}
is_healthy() { [ "$(state_of)" = running/healthy ]; }

in_ct systemctl start fleet-agentd.service || fail "fleet-agentd did not start"
[ "$(in_ct systemctl show -p WatchdogUSec --value fleet-agentd)" = 15s ] || fail "WatchdogSec=15s is not in effect"
in_ct agentctl apply -f /root/v1.toml || { journal; fail "apply v1 failed"; }
until_ok 60 "$dept healthy" is_healthy
pid=$(in_ct systemctl show -p MainPID --value fleet-agentd)
t0=$(date +%s)

log "update to a spec that never turns healthy (update_deadline 40s)"
in_ct agentctl apply -f /root/v2.toml || { journal; fail "apply v2 failed"; }
sleep 3
log "state during the proof: $(state_of)"

log "delete during the proof"
start=$(date +%s.%N)
in_ct agentctl delete "$dept" >/tmp/core12-del.$$ 2>&1 &
del_pid=$!
sleep 1
refused=$(in_ct agentctl apply -f /root/v1.toml 2>&1) && fail "an apply of $dept during its delete was accepted: $refused"
grep -q "$dept.*is being deleted" <<<"$refused" || fail "the refusal does not say $dept is being deleted: $refused"
wait "$del_pid" || { cat /tmp/core12-del.$$ >&2; journal; fail "agentctl delete failed"; }
rm -f /tmp/core12-del.$$
took=$(python3 -c "import sys,time; print(round(time.time()-float(sys.argv[1]),1))" "$start")
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < 15 else 1)" "$took" \
    || fail "agentctl delete took ${took}s (stop_timeout 8s)"
log "agentctl delete returned after ${took}s"
[ -z "$(docker ps -aq --filter "label=fleet-agent.node=$node" --filter "label=fleet-agent.department=$dept")" ] \
    || fail "a container of $dept is left after the delete"
[ "$(state_of)" = absent ] || fail "$dept is still listed: $(state_of)"

# More than 2x WatchdogSec since the update started, with the proof's 40s window over.
while [ $(( $(date +%s) - t0 )) -lt 45 ]; do sleep 1; done
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "not active"
[ "$(in_ct systemctl show -p MainPID --value fleet-agentd)" = "$pid" ] || { journal; fail "the daemon was restarted"; }
[ "$(in_ct systemctl show -p NRestarts --value fleet-agentd)" = 0 ] || fail "NRestarts is not 0"
grep -qi "watchdog timeout" <<<"$(in_ct journalctl -u fleet-agentd --no-pager)" && fail "systemd reported a watchdog timeout"
[ "$(state_of)" = absent ] || fail "$dept came back: $(state_of)"
log "ok: delete during a failing update answered in ${took}s, apply refused meanwhile, same pid $pid for 45s under WatchdogSec=15s"

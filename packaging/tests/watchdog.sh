#!/usr/bin/env bash
# The systemd watchdog as installed (issue 12): with a short WatchdogSec the
# daemon must keep pinging (fed by the heartbeat of its event and resync
# loops) for well past WatchdogSec, under the full sandbox, without being
# restarted; and a resync_interval that cannot fit in WatchdogSec must be
# refused at start, naming resync_interval and the largest that fits.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
dept=$PKGTEST_NAME-a
# Ports 47560-47569 (the pool, then the API).
api=127.0.0.1:47569
image=fleet-test-agent:1
installed_node_up "$node"

write_config() {
    in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
resync_interval = "$1"
[ports]
range = "47560-47564"
bind = "127.0.0.1"
[api]
listen = "$api"
TOML
}
write_config 2s
in_ct tee "/etc/fleet-agent/departments.d/$dept.toml" >/dev/null <<TOML
id = "$dept"
image = "$image"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
in_ct mkdir -p /etc/systemd/system/fleet-agentd.service.d
in_ct tee /etc/systemd/system/fleet-agentd.service.d/watchdog.conf >/dev/null <<'UNIT'
[Service]
WatchdogSec=20s
UNIT
in_ct systemctl daemon-reload

in_ct systemctl start fleet-agentd.service || {
    in_ct journalctl -u fleet-agentd --no-pager -n 40 >&2 || true
    fail "fleet-agentd did not start"
}
[ "$(in_ct systemctl show -p WatchdogUSec --value fleet-agentd)" = 20s ] || fail "WatchdogSec=20s is not in effect"
pid=$(in_ct systemctl show -p MainPID --value fleet-agentd)
log "running as pid $pid with WatchdogSec=20s; watching for 50s"
sleep 50
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "not active after 50s"
[ "$(in_ct systemctl show -p MainPID --value fleet-agentd)" = "$pid" ] || {
    in_ct journalctl -u fleet-agentd --no-pager -n 40 >&2 || true
    fail "the daemon was restarted: the watchdog was not fed"
}
[ "$(in_ct systemctl show -p NRestarts --value fleet-agentd)" = 0 ] || fail "NRestarts is not 0"
journal=$(in_ct journalctl -u fleet-agentd --no-pager)
grep -qi "watchdog timeout" <<<"$journal" && fail "systemd reported a watchdog timeout"
in_ct agentctl status --json >/dev/null || fail "agentctl status failed"

log "a resync_interval that cannot fit in WatchdogSec is refused"
in_ct systemctl stop fleet-agentd.service
write_config 30s
in_ct systemctl start fleet-agentd.service && fail "the daemon started with resync_interval = 30s and WatchdogSec = 20s"
# journald indexes what it receives a moment later, so look for a few seconds.
found=""
for _ in $(seq 1 20); do
    journal=$(in_ct journalctl -u fleet-agentd --no-pager -n 200)
    if grep -q 'resync_interval = 30s is too long for the unit.s WatchdogSec = 20s' <<<"$journal" &&
        grep -q 'at most 8s' <<<"$journal"; then found=1; break; fi
    sleep 0.5
done
[ -n "$found" ] || fail "the refusal does not name resync_interval, WatchdogSec and the largest interval that fits (8s):
$(tail -n 20 <<<"$journal")"
log "ok: fed for 50s under WatchdogSec=20s; resync_interval 30s refused"

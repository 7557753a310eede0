#!/usr/bin/env bash
# Test 3 (runtime half): the installed unit under a real systemd (PID 1 of a
# container made from the clean Debian root, with the host's Docker socket and
# network). Under the full sandbox the daemon must: report READY and STATUS,
# run as fleet-agent with no capabilities, reach the Docker socket (it starts a
# department), read host metrics from /proc, write its state and runtime dirs,
# log to journald through tracing-journald, survive a reload, and leave the
# department's container running when stopped.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
dept=$PKGTEST_NAME-a
# Ports 47510-47519 (the pool, then the API).
api=127.0.0.1:47519
image=fleet-test-agent:1
# Installed the way the Ansible role does it, except that the first start waits
# until this test's config is in place (its ports must not collide).
installed_node_up "$node"
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47510-47514"
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
TOML

log "systemctl start (returns after READY=1)"
in_ct systemctl start fleet-agentd.service || {
    in_ct journalctl -u fleet-agentd --no-pager -n 50 >&2 || true
    fail "fleet-agentd did not start under systemd"
}
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "not active after start"
status=$(in_ct systemctl show -p StatusText --value fleet-agentd)
[ -n "$status" ] || fail "no STATUS= text from the daemon"
log "status text: $status"
[ "$(in_ct systemctl show -p WatchdogUSec --value fleet-agentd)" = 1min ] || fail "WatchdogSec is not in effect"
pid=$(in_ct systemctl show -p MainPID --value fleet-agentd)

# Who and what the daemon is under the sandbox.
proc_status=$(in_ct cat "/proc/$pid/status")
uid=$(in_ct id -u fleet-agent)
docker_gid=$(stat -c %g /var/run/docker.sock)
grep -qE "^Uid:\s+$uid\s" <<<"$proc_status" || fail "the daemon does not run as fleet-agent"
grep -qE "^Groups:.*\b$docker_gid\b" <<<"$proc_status" || fail "the daemon is not in the docker group"
grep -qE '^CapEff:\s+0+$' <<<"$proc_status" || fail "the daemon has capabilities"
grep -qE '^NoNewPrivs:\s+1$' <<<"$proc_status" || fail "NoNewPrivileges is not in effect"
grep -qE '^Seccomp:\s+2$' <<<"$proc_status" || fail "no seccomp filter (SystemCallFilter) on the daemon"
in_ct awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo" | grep -q '^ro' || fail "ProtectSystem=strict is not in effect (/ is writable)"
in_ct test -S /run/fleet-agent/agentctl.sock || fail "no control socket in the runtime directory"
in_ct test -f /var/lib/fleet-agent/state.db || fail "no state.db in the state directory"
[ "$(in_ct stat -c '%a %U' /var/lib/fleet-agent)" = "750 fleet-agent" ] || fail "state dir mode changed"

# Docker reached: the department runs and is healthy on the host's engine.
log "waiting for department $dept"
healthy=""
for _ in $(seq 1 90); do
    if out=$(in_ct agentctl status --json 2>/dev/null) && python3 -c '
import json, sys
doc = json.loads(sys.argv[1])
deps = doc.get("departments", doc) if isinstance(doc, dict) else doc
ok = any(d.get("id") == sys.argv[2] and str(d.get("health", "")).lower() == "healthy" for d in deps)
sys.exit(0 if ok else 1)' "$out" "$dept" 2>/dev/null; then
        healthy=1; break
    fi
    sleep 1
done
[ -n "$healthy" ] || { in_ct agentctl status >&2 || true; in_ct journalctl -u fleet-agentd --no-pager -n 40 >&2 || true; fail "department $dept never became healthy"; }
[ "$(docker inspect -f '{{ index .Config.Labels "fleet-agent.node" }}' "aio-$dept")" = "$node" ] \
    || fail "aio-$dept does not carry the node label"

# Host metrics read from /proc under ProtectProc=invisible.
metrics=$(api_get "$api" /metrics) \
    || fail "GET /metrics failed"
python3 -c '
import sys
vals = {}
for line in sys.argv[1].splitlines():
    if line.startswith("fleet_agent_host_"):
        name, _, v = line.rpartition(" ")
        vals[name] = float(v)
mem = [v for k, v in vals.items() if "memory" in k]
cpu = [k for k in vals if "cpu" in k]
assert mem and max(mem) > 0, ("no host memory figures", vals)
assert cpu, ("no host CPU figures", vals)
' "$metrics" || fail "host metrics missing from /metrics"

# Logs go to journald with tracing's structured fields.
# journald indexes what it receives a moment later, so look for a few seconds.
found=""
for _ in $(seq 1 20); do
    journal=$(in_ct journalctl -u fleet-agentd -o json --no-pager)
    if grep -q '"TARGET":"fleet_agentd' <<<"$journal"; then found=1; break; fi
    sleep 0.5
done
[ -n "$found" ] || fail "no tracing-journald entries (TARGET field) from fleet-agentd in the journal:
$(tail -c 3000 <<<"$journal")"

# A department's events carry DEPARTMENT= and EVENT= fields to filter on.
found=""
for _ in $(seq 1 20); do
    # Whole output first (see installed-desired.sh: grep -q and SIGPIPE).
    entries=$(in_ct journalctl DEPARTMENT="$dept" EVENT=state_running -o cat --no-pager 2>/dev/null || true)
    if grep -q 'starting -> running' <<<"$entries"; then
        found=1; break
    fi
    sleep 0.5
done
[ -n "$found" ] || fail "journalctl DEPARTMENT=$dept EVENT=state_running found no 'starting -> running' entry:
$(in_ct journalctl -u fleet-agentd -o json --no-pager | grep -m3 "$dept" | cut -c1-800)"

log "reload, then stop: the department must keep running"
# A reload re-reads agent.toml: `[log] level` applies at once, anything else
# that changed is named as needing a restart rather than look applied.
# (`cat >` keeps the conffile's owner and mode.)
in_ct sh -c 'f=/etc/fleet-agent/agent.toml; { echo "resync_interval = \"45s\""; cat "$f"; printf "[log]\nlevel = \"debug\"\n"; } >"$f.new" && cat "$f.new" >"$f" && rm "$f.new"'
in_ct fleet-agentd check-config >/dev/null || fail "the edited agent.toml does not pass check-config"
in_ct systemctl reload fleet-agentd || fail "reload failed"
sleep 1
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "not active after reload"
[ "$(in_ct systemctl show -p MainPID --value fleet-agentd)" = "$pid" ] || fail "reload restarted the daemon"
found=""
for _ in $(seq 1 20); do
    journal=$(in_ct journalctl -u fleet-agentd --no-pager)
    if grep -q 'changed since the daemon started (resync_interval).*restart' <<<"$journal" &&
        grep -q 'log level is now debug' <<<"$journal"; then found=1; break; fi
    sleep 0.5
done
[ -n "$found" ] || fail "a reload after editing agent.toml did not apply the log level and name resync_interval as needing a restart:
$(in_ct journalctl -u fleet-agentd --no-pager | tail -n 15)"
started=$(docker inspect -f '{{ .State.StartedAt }}' "aio-$dept")
in_ct systemctl stop fleet-agentd || fail "stop failed"
[ "$(docker inspect -f '{{ .State.Running }}' "aio-$dept")" = true ] || fail "stopping the daemon stopped aio-$dept"
[ "$(docker inspect -f '{{ .State.StartedAt }}' "aio-$dept")" = "$started" ] || fail "aio-$dept was restarted"

out=$(in_ct systemd-analyze security --threshold=20 fleet-agentd.service 2>&1) || fail "exposure of the loaded unit above 2.0:
$out"
log "ok: $(grep -o 'Overall exposure level.*' <<<"$out")"

#!/usr/bin/env bash
# As installed: the shipped alert rules in a real Prometheus, and the
# department containers' log driver, under the shipped unit (daemon as
# fleet-agent), in one systemd container on the host's engine:
#   1. [docker] log_driver/log_options: with the default, a department the
#      daemon creates logs with the engine's json-file plus max-size 10m and
#      max-file 3 (docker inspect HostConfig.LogConfig); `log_driver = "local"`
#      with a max-size in /etc/fleet-agent/agent.toml is not applied by a
#      reload (the journal says a restart is needed); the documented
#      `systemctl restart` gives the next department the local driver with
#      that size and max-file 3, and leaves the existing container as it was;
#   2. Prometheus set up as docs/install.md and docs/metrics.md say: a
#      `prometheus` system user, the daemon's generated token copied with
#      `install -m 0640 -o root -g prometheus` to /etc/prometheus/fleet-agent.token
#      (credentials_file), and the rules file where the .deb installs it
#      (`dpkg -L fleet-agent`), read in place by Prometheus running as that
#      user. With the healthy departments only, a rule evaluation over their
#      scraped metrics raises no alert (not even pending) and every rule
#      evaluates without error;
#   3. a department that crash-loops raises FleetDepartmentCrashLooping to
#      firing, for it alone (the healthy ones and the node raise nothing);
#   4. `systemctl stop fleet-agentd` raises FleetAgentDown for the node, and
#      Prometheus logged no error.
# Waits out the rules' own `for:` (1m, 2m) and group interval (30s): about 5 min.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
ok=$PKGTEST_NAME-ok
late=$PKGTEST_NAME-late
crash=$PKGTEST_NAME-crash
# Ports 44640-44679: the pool 44641-44645, the API 44649, Prometheus 44670.
api=127.0.0.1:44649
prom=127.0.0.1:44670
rules_installed=/usr/share/fleet-agent/prometheus/fleet-agent-rules.yml

prom_bin=$(command -v prometheus) || fail "prometheus is missing (scripts/test.sh service_prometheus)"
installed_node_up "$node"
# On failure, what Prometheus said too (its transient unit, step 2).
trap 'rc=$?; [ $rc -eq 0 ] || [ -z "${SD_CT:-}" ] || in_ct journalctl -u prometheus --no-pager -n 40 >&2 || true
      _installed_node_exit $rc; exit $rc' EXIT

# journal and until_ok: lib.sh.
config() {
    in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "44641-44645"
bind = "127.0.0.1"
[api]
listen = "$api"
$1
TOML
}
spec() { # ID [ENV-TOML] [RESTART-TOML]
    in_ct tee "/tmp/$1.toml" >/dev/null <<TOML
id = "$1"
image = "fleet-test-agent:1"
${2:-}
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
[restart]
stop_timeout = "2s"
${3:-}
TOML
    in_ct agentctl apply -f "/tmp/$1.toml" >/dev/null || { journal 40; fail "apply of $1"; }
}
state_of() { in_ct agentctl status --json | python3 -c "
import json, sys
d = [r for r in json.load(sys.stdin)['departments'] if r['id'] == sys.argv[1]]
print(d[0]['state'] if d else '')" "$1"; }
runs() { [ "$(state_of "$1")" = running ]; }
container_of() { in_ct agentctl status --json | python3 -c "
import json, sys
d = [r for r in json.load(sys.stdin)['departments'] if r['id'] == sys.argv[1]]
print(d[0]['container_id'] if d else '')" "$1"; }
# log_config DEPT: "<Type> <Config as sorted JSON>" of its container.
log_config() {
    local id; id=$(container_of "$1")
    [ -n "$id" ] || fail "$1 has no container"
    docker inspect --format '{{ .HostConfig.LogConfig.Type }} {{ json .HostConfig.LogConfig.Config }}' "$id"
}

# Prometheus' HTTP API on the host's loopback (the container has the host's network).
prom_get() { curl -sf --max-time 5 "http://$prom$1"; }
# alerts: one line per pending or firing alert, "<state> <alertname> <department or instance>".
alerts() { prom_get /api/v1/alerts | python3 -c "
import json, sys
for a in json.load(sys.stdin)['data']['alerts']:
    l = a['labels']
    print(a['state'], l['alertname'], l.get('department', l.get('instance', '')))"; }
firing() { grep -qx "firing $1 $2" <<<"$(alerts)"; }

log "1. [docker] log_driver: the default, then local (a reload refuses, the documented restart applies)"
# The engine is the host's; its DockerRootDir must exist here as on a real
# host (root 0710), or the disk metrics the rules read are missing.
in_ct install -d -m 0710 "$(docker info --format '{{ .DockerRootDir }}')"
config ""
in_ct systemctl start fleet-agentd.service || { journal 50; fail "fleet-agentd did not start"; }
until_ok 30 "agentctl status to answer" in_ct agentctl status
spec "$ok"
until_ok 60 "$ok to run" runs "$ok"
engine_driver=$(docker info --format '{{ .LoggingDriver }}')
got=$(log_config "$ok")
[ "$got" = "$engine_driver {\"max-file\":\"3\",\"max-size\":\"10m\"}" ] \
    || fail "$ok logs with '$got', expected the engine's $engine_driver with max-size 10m, max-file 3"
ok_container=$(container_of "$ok")
config '[docker]
log_driver = "local"
log_options = { max-size = "5m" }'
in_ct fleet-agentd check-config --config-only >/dev/null || fail "check-config refuses the log_driver config"
# A reload does not apply [docker] and says so; the restart does.
in_ct systemctl reload fleet-agentd.service || fail "systemctl reload failed"
reload_refused() { grep "a reload does not apply that" <<<"$(in_ct journalctl -u fleet-agentd --no-pager -n 20)" | grep -q "docker"; }
until_ok 15 "the reload to say that [docker] needs a restart" reload_refused
in_ct systemctl restart fleet-agentd.service || { journal 50; fail "fleet-agentd did not restart"; }
until_ok 30 "agentctl status to answer after the restart" in_ct agentctl status
spec "$late"
until_ok 60 "$late to run" runs "$late"
got=$(log_config "$late")
[ "$got" = 'local {"max-file":"3","max-size":"5m"}' ] \
    || fail "$late logs with '$got', expected local with max-size 5m, max-file 3"
# "Applies to containers created after the change" (docs/agent.toml.md).
[ "$(container_of "$ok")" = "$ok_container" ] || fail "the restart replaced $ok's container"
got=$(log_config "$ok")
[ "$got" = "$engine_driver {\"max-file\":\"3\",\"max-size\":\"10m\"}" ] || fail "$ok's log config changed to '$got'"

log "2. Prometheus as the docs set it up: healthy departments raise nothing"
rules=$(in_ct dpkg -L fleet-agent | grep '/fleet-agent-rules\.yml$') || fail "the .deb ships no fleet-agent-rules.yml"
[ "$rules" = "$rules_installed" ] || fail "the rules are installed as $rules, docs/metrics.md names $rules_installed"
# What Debian's prometheus package would do: its binary (the host's, extracted
# from that package by scripts/test.sh; it links only libc) and its system
# user, which owns the data directory and is in no other group.
in_ct sh -c 'cat >/usr/bin/prometheus && chmod 755 /usr/bin/prometheus' <"$prom_bin" \
    || fail "cannot copy prometheus into $SD_CT"
in_ct adduser --quiet --system --group --home /var/lib/prometheus --no-create-home prometheus
in_ct install -d -o prometheus -g prometheus /var/lib/prometheus /var/lib/prometheus/metrics2
in_ct install -d /etc/prometheus
# docs/install.md, word for word:
in_ct install -m 0640 -o root -g prometheus /var/lib/fleet-agent/api.token /etc/prometheus/fleet-agent.token
# docs/metrics.md's prometheus.yml. Deviations forced by the rig: the target
# is this node's loopback API; scrape and evaluation every second (Debian's
# default is 1m; the rules' own group interval, 30s, and `for:` stay as
# shipped), so the test waits minutes and not a quarter of an hour.
in_ct tee /etc/prometheus/prometheus.yml >/dev/null <<YML
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
scrape_configs:
  - job_name: fleet-agent
    authorization:
      credentials_file: /etc/prometheus/fleet-agent.token
    static_configs:
      - targets: ["$api"]
rule_files:
  - $rules_installed
YML
# As Debian's unit runs it (User=prometheus), on a loopback port of this test's range.
in_ct systemd-run --quiet --unit=prometheus --uid=prometheus --gid=prometheus \
    /usr/bin/prometheus --config.file=/etc/prometheus/prometheus.yml \
    --storage.tsdb.path=/var/lib/prometheus/metrics2 --web.listen-address="$prom" \
    || fail "cannot start prometheus"
until_ok 30 "prometheus to be ready" prom_get /-/ready
scraped() { # QUERY: at least one sample in Prometheus now
    prom_get "/api/v1/query?query=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1")" \
        | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}
q_up="up{job=\"fleet-agent\",instance=\"$api\"} == 1"
q_healthy="sum(fleet_agent_department_state{state=\"running\",department=~\"$ok|$late\"}) == 2"
until_ok 30 "the node scraped as up (with the copied token, as prometheus)" scraped "$q_up"
until_ok 30 "both healthy departments running in Prometheus" scraped "$q_healthy"
# The rules' group evaluates every 30s: wait for an evaluation after the
# healthy departments were scraped. Any rule true then would be pending.
seen=$(date -u +%s.%N)
evaluated_after() { prom_get /api/v1/rules | python3 -c '
import datetime, json, re, sys
since = float(sys.argv[1])
groups = json.load(sys.stdin)["data"]["groups"]
g = [g for g in groups if g["name"] == "fleet_agent"]
if not g:
    sys.exit(1)
# RFC 3339 with nanoseconds: Python parses at most microseconds.
last = re.sub(r"(\.\d{6})\d+", r"\1", g[0]["lastEvaluation"]).replace("Z", "+00:00")
sys.exit(0 if datetime.datetime.fromisoformat(last).timestamp() > since else 1)' "$1"; }
until_ok 70 "a rule evaluation after the healthy departments were scraped" evaluated_after "$seen"
quiet=$(alerts)
[ -z "$quiet" ] || fail "alerts with healthy departments only: $quiet"
bad_rules=$(prom_get /api/v1/rules | python3 -c '
import json, sys
groups = json.load(sys.stdin)["data"]["groups"]
names = [r["name"] for g in groups for r in g["rules"]]
if "FleetDepartmentCrashLooping" not in names or "FleetAgentDown" not in names:
    print("the shipped rules were not loaded:", names)
for g in groups:
    for r in g["rules"]:
        if r["health"] != "ok":
            print(r["name"], r["health"], r.get("lastError", ""))')
[ -z "$bad_rules" ] || fail "rules: $bad_rules"

log "3. a crash-looping department raises FleetDepartmentCrashLooping, for it alone"
spec "$crash" '[env]
CRASH_AFTER = "1s"
EXIT_CODE = "3"' 'max_retries = 2
backoff = "1s"
window = "10m"'
crash_looping() { [ "$(state_of "$crash")" = crash_looping ]; }
until_ok 60 "$crash to be parked as crash_looping" crash_looping
parked=$(date +%s)
until_ok 150 "FleetDepartmentCrashLooping to fire for $crash" firing FleetDepartmentCrashLooping "$crash"
log "FleetDepartmentCrashLooping fired $(( $(date +%s) - parked )) s after $crash was parked"
now=$(alerts)
for d in "$ok" "$late"; do
    ! grep -q " $d\$" <<<"$now" || fail "an alert names the healthy $d: $now"
done
! grep -q "FleetAgentDown" <<<"$now" || fail "FleetAgentDown while the daemon runs: $now"

log "4. systemctl stop fleet-agentd raises FleetAgentDown"
in_ct systemctl stop fleet-agentd.service
stopped=$(date +%s)
until_ok 200 "FleetAgentDown to fire for $api" firing FleetAgentDown "$api"
log "FleetAgentDown fired $(( $(date +%s) - stopped )) s after the stop"
errors=$(in_ct journalctl -u prometheus --no-pager | grep 'level=error' || true)
[ -z "$errors" ] || fail "prometheus logged errors: $errors"
in_ct systemctl stop prometheus.service || true
log "OK"

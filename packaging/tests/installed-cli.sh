#!/usr/bin/env bash
# As installed (issue 14): what an operator sees from bad input and from the
# event log, with the daemon as fleet-agent under the shipped unit. Each
# refusal of `agentctl apply -f` names the file, line and column and the dotted
# field, a secret's value never reaches the terminal or the journal, an explicit
# host_port outside the pool is refused with the range named, nothing is
# created for a refused spec; `agentctl events -n` / `--department` return
# what they say; `fleet-agentd config show` masks a password in wal.postgres.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
good=$PKGTEST_NAME-g
bad=$PKGTEST_NAME-b
# Ports 44800-44809 (the pool 44801-44804, the API 44809).
api=127.0.0.1:44809
pin=$((100000 + RANDOM))
installed_node_up "$node"

in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "44801-44804"
bind = "127.0.0.1"
[api]
listen = "$api"
[wal]
target = "file:///var/backups/fleet-agent"
socket = "/run/fleet-agent-wal/wal.sock"
postgres = "host=/var/run/postgresql user=postgres password=pw-$pin"
TOML
in_ct systemctl start fleet-agentd.service || { journal 50; fail "fleet-agentd did not start"; }
until_ok 30 "agentctl status never answered" in_ct agentctl status

log "1. a good department"
in_ct tee /root/good.toml >/dev/null <<TOML
id = "$good"
image = "fleet-test-agent:1"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
in_ct agentctl apply --wait -f /root/good.toml >/dev/null 2>&1 || { journal; fail "agentctl apply of the good spec failed"; }

log "2. bad specs are refused naming file, line:column and field"
refused() { # FILE EXPECTED-PREFIX-OR-TEXT: apply must fail and stderr must contain it
    local out
    if out=$(in_ct agentctl apply -f "$1" 2>&1); then
        fail "$1 was accepted: $out"
    fi
    grep -qF -- "$2" <<<"$out" || fail "refusing $1, the message does not say '$2': $out"
    printf '%s\n' "$out"
}
spec_with() { # NAME EXTRA-TOML
    in_ct tee "/root/$1.toml" >/dev/null <<TOML
id = "$bad"
image = "fleet-test-agent:1"
$2
TOML
}
spec_with duration $'[health]\ninterval = "soon"'
refused /root/duration.toml '/root/duration.toml:4:12: health.interval:' >/dev/null
spec_with syntax 'command = [unclosed'
refused /root/syntax.toml '/root/syntax.toml:3:' >/dev/null
spec_with port 'host_port = 22'
refused /root/port.toml '[ports] range 44801-44804' >/dev/null
spec_with secret $'[secrets]\nDB_PIN = '"$pin"
out=$(refused /root/secret.toml '/root/secret.toml:4:10: secrets.DB_PIN:')
grep -qF "$pin" <<<"$out" && fail "the refusal echoed the secret's value: $out"
grep -qF "$pin" <<<"$(in_ct journalctl -u fleet-agentd --no-pager)" && fail "the secret's value reached the journal"
docker inspect "aio-$bad" >/dev/null 2>&1 && fail "a container was made for a refused spec"

log "3. agentctl events -n, --department"
in_ct agentctl restart "$good" >/dev/null 2>&1 || fail "agentctl restart $good failed"
until_ok 30 "aio-$good did not come back" sh -c "[ \"\$(docker inspect -f '{{ .State.Running }}' aio-$good 2>/dev/null)\" = true ]"
count_events() { # ARGS...: the number of events agentctl events --json ARGS returns
    in_ct agentctl events --json "$@" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["events"]))'
}
all=$(count_events -n 1000)
[ "$all" -gt 2 ] || fail "expected more than 2 events by now, got $all"
[ "$(count_events -n 2)" = 2 ] || fail "agentctl events -n 2 did not return 2 events"
mine=$(in_ct agentctl events --json -n 1000 --department "$good")
python3 - "$good" "$mine" <<'PY' || fail "agentctl events --department $good: $mine"
import json, sys
good, page = sys.argv[1], json.loads(sys.argv[2])
events = page["events"]
assert events, "none"
assert all(e["department"] == good for e in events), [e["department"] for e in events]
PY
[ "$(count_events -n 1000 --department "$good")" -lt "$all" ] \
    || fail "--department $good returned as many events as the whole node"

log "4. fleet-agentd config show masks wal.postgres' password"
shown=$(in_ct fleet-agentd config show) || fail "fleet-agentd config show failed"
grep -qF "pw-$pin" <<<"$shown" && fail "config show printed the password"
grep -qF "host=/var/run/postgresql" <<<"$shown" || fail "config show does not show wal.postgres: $shown"
log "ok: refusals name file:line:column and field, no secret echoed, events -n/--department, config show masked"

#!/usr/bin/env bash
# As installed: the local API's defaults under the shipped unit (daemon as
# fleet-agent), in one systemd container:
#   1. no api.token_file: the daemon generates /var/lib/fleet-agent/api.token
#      (0640 fleet-agent:fleet-agent); the TCP API refuses a request without it
#      (401) and serves a scrape with it; a member of the fleet-agent group can
#      read it and use agentctl, another user can do neither;
#   2. the token is rotated without a restart: a second line and
#      `systemctl reload` (both accepted), then the old line removed and
#      reload (old refused); a third line is refused and the tokens stay;
#   3. `nobody` floods the control socket with 300 connections: root's
#      agentctl keeps answering, and nobody's connections are closed (none
#      left open after 5 s).
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
# Ports 47660-47669 (the pool 47660-47664, then the API).
api=127.0.0.1:47669
token_path=/var/lib/fleet-agent/api.token
installed_node_up "$node"

journal() { in_ct journalctl -u fleet-agentd --no-pager -n "${1:-30}" >&2 || true; }
wait_until() { # SECONDS WHAT COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq 1 $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    journal 40
    fail "$what (after ${seconds}s)"
}

answers() { [ "$(status "$1")" = "$2" ]; }
journal_has() { in_ct journalctl -u fleet-agentd --no-pager -n 80 | grep -q "$1"; }

# status TOKEN: the HTTP status of GET /v1/node with that bearer token ("" = none).
status() {
    in_ct python3 - "$api" "$1" <<'PY'
import sys, urllib.request, urllib.error
addr, token = sys.argv[1], sys.argv[2]
headers = {"Authorization": "Bearer " + token} if token else {}
try:
    print(urllib.request.urlopen(urllib.request.Request("http://" + addr + "/v1/node", headers=headers), timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
}

in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47660-47664"
bind = "127.0.0.1"
[api]
listen = "$api"
TOML
in_ct systemctl start fleet-agentd.service || { journal 50; fail "fleet-agentd did not start"; }
wait_until 30 "agentctl status never answered" in_ct agentctl status

log "1. the generated token: 0640 fleet-agent:fleet-agent, required by the TCP API"
[ "$(in_ct stat -c '%a %U:%G' "$token_path")" = "640 fleet-agent:fleet-agent" ] \
    || fail "$token_path: $(in_ct stat -c '%a %U:%G' "$token_path" 2>&1)"
token=$(in_ct cat "$token_path")
[ "${#token}" -eq 64 ] || fail "the generated token is not 64 hex digits: ${#token} characters"
[ "$(status "")" = 401 ] || fail "GET /v1/node without a token was not refused"
[ "$(status "$token")" = 200 ] || fail "GET /v1/node with the generated token: $(status "$token")"
grep -q '^fleet_agent_departments ' <<<"$(api_get "$api" /metrics)" || fail "a scrape with the token has no fleet_agent_departments"
in_ct useradd -M -G fleet-agent ops
in_ct useradd -M outsider
ops_token=$(in_ct runuser -u ops -- cat "$token_path") || fail "a fleet-agent group member cannot read the token"
[ "$ops_token" = "$token" ] || fail "ops read another token"
in_ct runuser -u ops -- agentctl status >/dev/null || fail "a fleet-agent group member cannot use agentctl"
in_ct runuser -u outsider -- cat "$token_path" >/dev/null 2>&1 && fail "another user can read the token"
out=$(in_ct runuser -u outsider -- agentctl status 2>&1) && fail "another user can use agentctl: $out"
grep -q "permission denied" <<<"$out" || fail "agentctl as another user was not refused by the daemon: $out"

log "2. rotation with systemctl reload"
next=$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')
write_tokens() { printf '%s\n' "$@" | in_ct sh -c "cat >$token_path"; }
write_tokens "$token" "$next"
in_ct systemctl reload fleet-agentd
wait_until 20 "the next token was not accepted after the reload" answers "$next" 200
[ "$(status "$token")" = 200 ] || fail "the old token was refused while both are listed"
write_tokens "$next"
in_ct systemctl reload fleet-agentd
wait_until 20 "the old token was still accepted after its line went" answers "$token" 401
write_tokens "$next" "a-third-$RANDOM" "a-fourth-$RANDOM"
in_ct systemctl reload fleet-agentd
wait_until 20 "a three-line token file was not refused" journal_has 'holds 3 tokens'
[ "$(status "$next")" = 200 ] || fail "the tokens in force did not stay after a refused file"
in_ct systemctl is-active -q fleet-agentd || fail "the refused token file stopped the daemon"

log "3. nobody floods the control socket"
in_ct runuser -u nobody -- python3 - /run/fleet-agent/agentctl.sock 300 5 >/tmp/flood.$$ 2>&1 <<'PY' &
import socket, select, sys, time
path, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held = []
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        break
    held.append(s)
time.sleep(hold)
still = 0
for s in held:
    readable, _, _ = select.select([s], [], [], 0)
    if not readable:
        still += 1
    elif s.recv(1):
        still += 1
print(f"connected={len(held)} open={still}")
PY
flood=$!
sleep 0.5
for i in $(seq 1 12); do
    started=$(date +%s%N)
    in_ct agentctl status >/dev/null || fail "root's agentctl status failed during the flood (call $i)"
    took=$(( ($(date +%s%N) - started) / 1000000 ))
    [ "$took" -lt 3000 ] || fail "root's agentctl status took ${took} ms during the flood"
    sleep 0.25
done
wait "$flood" || fail "the flood script failed: $(cat /tmp/flood.$$)"
result=$(cat /tmp/flood.$$); rm -f /tmp/flood.$$
log "flood: $result"
connected=$(sed -n 's/.*connected=\([0-9]*\).*/\1/p' <<<"$result")
open=$(sed -n 's/.*open=\([0-9]*\).*/\1/p' <<<"$result")
[ "${connected:-0}" -ge 100 ] || fail "the flood did not connect: $result"
[ "${open:-1}" -eq 0 ] || fail "nobody still held $open of $connected connections after 5 s: $result"
in_ct agentctl status >/dev/null || fail "agentctl status after the flood"
log "ok"

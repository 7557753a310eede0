#!/usr/bin/env bash
# As installed: network, hardening and secrets as files under the shipped unit
# (daemon as fleet-agent, no capabilities, ProtectSystem=strict):
#   1. the department network is created by the daemon (its label, inter-
#      container communication off) and the container is on it;
#   2. the hardening shows in docker inspect (PidsLimit, CapDrop ALL, Init,
#      read-only root with a /tmp tmpfs, no-new-privileges) and the probe and
#      /metrics keep working;
#   3. secrets_mode = "files": the container reads the canary from the file
#      DB_PASSWORD_FILE names, and the canary is in neither its environment,
#      docker inspect, nor the engine's config.v2.json; the files are 0444 in
#      a 0755 directory under a 0700 one owned by fleet-agent;
#   4. a second department cannot reach the first one's container;
#   5. systemctl restart adopts the container untouched; agentctl delete
#      removes it and its secret files.
#
# The engine is the host's (its socket is mounted into the systemd container),
# so a bind mount's source is a host path, while the daemon writes in the
# systemd container's own /run. On a real host both are one /run and the
# default secrets_dir (/run/fleet-agent/secrets, in the unit's
# RuntimeDirectory) just works. Here a tmpfs mounted on the host is bridged
# into the container at the same path, named as secrets_dir, and given to the
# unit with ReadWritePaths= (what docs/install.md says for a secrets_dir
# outside /run/fleet-agent).
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
a=$PKGTEST_NAME-a
b=$PKGTEST_NAME-b
net=$PKGTEST_NAME-net
# Ports 47620-47629 (the pool 47620-47624, then the API).
api=127.0.0.1:47629
image=fleet-test-agent:1
shared=/run/fleet-pkgtest-$PKGTEST_NAME
canary="canary-$PKGTEST_NAME-Jx4Rw8"

mkdir -p "$shared"
mount -t tmpfs -o size=4m,mode=0755 tmpfs "$shared"
PKGTEST_CT_ARGS=(-v "$shared:$shared")
installed_node_up "$node"
_hardening_exit() {
    local rc=$1
    _installed_node_exit "$rc"
    docker network rm "$net" >/dev/null 2>&1 || true
    umount "$shared" 2>/dev/null || umount -l "$shared" 2>/dev/null || true
    rmdir "$shared" 2>/dev/null || true
}
trap '_hardening_exit $?' EXIT

# journal and until_ok: lib.sh.
running() { [ "$(docker inspect -f '{{ .State.Running }}' "aio-$1" 2>/dev/null)" = true ]; }
healthy() { in_ct agentctl status --json | python3 -c "import json,sys; d=[x for x in json.load(sys.stdin)['departments'] if x['id']=='$1']; sys.exit(0 if d and d[0]['state']=='running' and d[0]['health']=='healthy' else 1)"; }
port_of() { docker inspect -f '{{ index .Config.Labels "fleet-agent.host-port" }}' "aio-$1"; }
get() { in_ct python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
PY
}
fnv() { python3 -c "import sys
h=0xcbf29ce484222325
b=sys.argv[1].encode()
for c in b: h=((h^c)*0x100000001b3)%(1<<64)
print('%d %016x' % (len(b), h))" "$1"; }
hc() { docker inspect -f "{{ json .HostConfig.$2 }}" "aio-$1"; }

in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47620-47624"
bind = "127.0.0.1"
[api]
listen = "$api"
[containers]
network = "$net"
bridge_name = ""
secrets_mode = "files"
secrets_dir = "$shared/secrets"
TOML
in_ct mkdir -p /etc/systemd/system/fleet-agentd.service.d
in_ct sh -c "printf '[Service]\nReadWritePaths=$shared\n' >/etc/systemd/system/fleet-agentd.service.d/secrets-dir.conf"
in_ct chown fleet-agent:fleet-agent "$shared"
in_ct systemctl daemon-reload
in_ct fleet-agentd check-config --config-only >/dev/null || fail "check-config refuses the [containers] table"
in_ct systemctl start fleet-agentd.service || { journal 50; fail "fleet-agentd did not start"; }

spec() {
    cat <<TOML
id = "$1"
image = "$image"
[security]
pids_limit = 128
read_only_root = true
[secrets]
DB_PASSWORD = "$canary"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
}

log "1. apply: the network is created and the container joins it"
spec "$a" | in_ct tee /root/a.toml >/dev/null
in_ct agentctl apply -f /root/a.toml || { journal; fail "agentctl apply failed"; }
until_ok 60 "aio-$a never ran healthy" healthy "$a"
[ "$(docker network inspect -f '{{ index .Labels "fleet-agent.managed" }}' "$net")" = true ] \
    || fail "network $net lacks the fleet-agent.managed label"
[ "$(docker network inspect -f '{{ index .Options "com.docker.network.bridge.enable_icc" }}' "$net")" = false ] \
    || fail "network $net allows inter-container communication"
[ "$(hc "$a" NetworkMode)" = "\"$net\"" ] || fail "aio-$a is not on $net: $(hc "$a" NetworkMode)"

log "2. hardening in docker inspect; probe and metrics work"
[ "$(hc "$a" PidsLimit)" = 128 ] || fail "PidsLimit is $(hc "$a" PidsLimit)"
[ "$(hc "$a" CapDrop)" = '["ALL"]' ] || fail "CapDrop is $(hc "$a" CapDrop)"
[ "$(hc "$a" Init)" = true ] || fail "Init is $(hc "$a" Init)"
[ "$(hc "$a" ReadonlyRootfs)" = true ] || fail "ReadonlyRootfs is $(hc "$a" ReadonlyRootfs)"
grep -q '"/tmp"' <<<"$(hc "$a" Tmpfs)" || fail "no /tmp tmpfs: $(hc "$a" Tmpfs)"
grep -q 'no-new-privileges:true' <<<"$(hc "$a" SecurityOpt)" || fail "no no-new-privileges: $(hc "$a" SecurityOpt)"
port=$(port_of "$a")
# The TCP API asks for the token the daemon generated (lib.sh api_get reads it).
metrics=$(api_get "$api" /metrics)
grep -q "fleet_agent_department_healthy{department=\"$a\"} 1" <<<"$metrics" || fail "/metrics does not say $a is healthy"

log "3. secrets as files: read by the container, absent from inspect and config.v2.json"
[ "$(get "http://127.0.0.1:$port/file/DB_PASSWORD")" = "200 $(fnv "$canary")" ] \
    || fail "the container does not read the canary from DB_PASSWORD_FILE: $(get "http://127.0.0.1:$port/file/DB_PASSWORD")"
[ "$(get "http://127.0.0.1:$port/env/DB_PASSWORD" | cut -d' ' -f1)" = 404 ] || fail "DB_PASSWORD is in the environment"
cid=$(docker inspect -f '{{ .Id }}' "aio-$a")
! grep -qF "$canary" <<<"$(docker inspect "aio-$a")" || fail "the canary is in docker inspect"
v2=/var/lib/docker/containers/$cid/config.v2.json
[ -f "$v2" ] || fail "no $v2"
grep -q DB_PASSWORD_FILE "$v2" || fail "$v2 is not this container's config"
! grep -qF "$canary" "$v2" || fail "the canary is in $v2"
key=$(docker inspect -f '{{ index .Config.Labels "fleet-agent.secrets" }}' "aio-$a")
[ "$(in_ct stat -c '%a %U' "$shared/secrets")" = "700 fleet-agent" ] || fail "$shared/secrets is $(in_ct stat -c '%a %U' "$shared/secrets")"
[ "$(in_ct stat -c '%a %U' "$shared/secrets/$key")" = "755 fleet-agent" ] || fail "the container's secrets directory is $(in_ct stat -c '%a %U' "$shared/secrets/$key")"
[ "$(in_ct stat -c '%a %U' "$shared/secrets/$key/DB_PASSWORD")" = "444 fleet-agent" ] || fail "the secret file is $(in_ct stat -c '%a %U' "$shared/secrets/$key/DB_PASSWORD")"

log "4. another department cannot reach it"
spec "$b" | in_ct tee /root/b.toml >/dev/null
in_ct agentctl apply -f /root/b.toml || { journal; fail "agentctl apply of $b failed"; }
until_ok 60 "aio-$b never ran healthy" healthy "$b"
ip_a=$(docker inspect -f "{{ (index .NetworkSettings.Networks \"$net\").IPAddress }}" "aio-$a")
[ "$(get "http://127.0.0.1:$(port_of "$b")/connect/$ip_a:8080" | cut -d' ' -f1)" = 502 ] \
    || fail "aio-$b reached aio-$a at $ip_a:8080"

log "5. restart adopts; delete removes the container and its secret files"
in_ct systemctl restart fleet-agentd || { journal 50; fail "restart failed"; }
until_ok 60 "aio-$a is not healthy after the restart" healthy "$a"
[ "$(docker inspect -f '{{ .Id }}' "aio-$a")" = "$cid" ] || fail "the restart replaced aio-$a instead of adopting it"
in_ct agentctl delete "$a" || { journal; fail "agentctl delete failed"; }
! in_ct test -e "$shared/secrets/$key" || fail "delete left $shared/secrets/$key"
log "ok: network, hardening and secrets as files as installed"

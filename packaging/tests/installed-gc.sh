#!/usr/bin/env bash
# As installed: image garbage collection and the disk-pressure guard under the
# shipped unit (daemon as fleet-agent, ProtectSystem=strict), in one systemd
# container on the host's engine, pulling from Debian's docker-registry on the
# host's loopback:
#   1. with the default [images] (the engine's DockerRootDir), the daemon can
#      statvfs the data root as fleet-agent under the sandbox
#      (fleet_agent_disk_used_ratio > 0);
#   2. a department goes through three images the agent pulls (1, 2, 3) while
#      the guard watches a small tmpfs (images.disk_path); filling it past the
#      high watermark collects image 1 and keeps 3 (current), 2 (rollback) and
#      an image the agent did not pull; disk_pressure and image_removed are in
#      `agentctl events`, fleet_agent_disk_pressure is 1;
#   3. the spec file names `next_image = image 4` (the coordinator's way of
#      announcing, here through agentctl apply): image 4 is pulled with the
#      container left as it is, and the update to it then pulls nothing.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
dept=$PKGTEST_NAME-w
# Ports 47640-47659: the registry 47640, the pool 47641-47645, the API 47649.
registry_port=47640
api=127.0.0.1:47649
repo=127.0.0.1:$registry_port/$PKGTEST_NAME
foreign=fleet-gc-foreign-$PKGTEST_NAME:1
disk=/srv/fleet-gc-disk

[ -x /usr/bin/docker-registry ] || fail "/usr/bin/docker-registry is missing (apt-get install docker-registry)"
installed_node_up "$node"

regdir=$(mktemp -d)
cat >"$regdir/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $regdir/data
http:
  addr: 127.0.0.1:$registry_port
YML
/usr/bin/docker-registry serve "$regdir/config.yml" >"$regdir/log" 2>&1 &
registry_pid=$!
cleanup_gc() {
    kill "$registry_pid" 2>/dev/null || true
    for i in 1 2 3 4; do docker rmi "$repo:$i" >/dev/null 2>&1 || true; done
    docker rmi "$foreign" >/dev/null 2>&1 || true
    rm -rf "$regdir"
}
trap 'rc=$?; _installed_node_exit $rc; cleanup_gc; exit $rc' EXIT

# journal and until_ok: lib.sh.
metric() {
    # The TCP API asks for the token the daemon generated (lib.sh api_get reads it).
    api_get "$api" /metrics | awk -v n="$1" '$1 == n { print $2 }'
}
has_image() { docker image inspect "$1" >/dev/null 2>&1; }
runs() { in_ct agentctl status --json | python3 -c "
import json, sys
d = [r for r in json.load(sys.stdin)['departments'] if r['id'] == sys.argv[1]]
sys.exit(0 if d and d[0]['state'] == 'running' and d[0]['image'] == sys.argv[2] else 1)" "$dept" "$1"; }
build() {
    printf 'FROM fleet-test-agent:1\nLABEL fleet-gc-test=%s\n' "$2" | docker build -q -t "$1" - >/dev/null
}
config() {
    in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47641-47645"
bind = "127.0.0.1"
[api]
listen = "$api"
$1
TOML
}

until_ok 30 "the registry to answer" curl -sf "http://127.0.0.1:$registry_port/v2/"
for i in 1 2 3 4; do
    build "$repo:$i" "$PKGTEST_NAME-$i"
    docker push -q "$repo:$i" >/dev/null
    docker rmi "$repo:$i" >/dev/null
done
build "$foreign" "$PKGTEST_NAME-foreign"

log "1. default [images]: the data root is watched as fleet-agent under the unit"
# The engine is the host's; its DockerRootDir must exist here as on a real host (root 0710).
in_ct install -d -m 0710 "$(docker info --format '{{ .DockerRootDir }}')"
config ""
in_ct systemctl start fleet-agentd.service || { journal 50; fail "fleet-agentd did not start"; }
ratio_above_zero() { local r; r=$(metric fleet_agent_disk_used_ratio); [ -n "$r" ] && [ "$r" != 0 ]; }
until_ok 60 "fleet_agent_disk_used_ratio above 0" ratio_above_zero
[ "$(in_ct systemctl show -p User --value fleet-agentd)" = fleet-agent ] || fail "the unit does not run as fleet-agent"

log "2. three pulled images, then a full disk: image 1 goes, 2, 3 and a foreign one stay"
in_ct mkdir -p "$disk"
in_ct mount -t tmpfs -o size=8m tmpfs "$disk" || fail "cannot mount a tmpfs in the container"
config "[images]
disk_check_interval = \"500ms\"
disk_high_watermark = 80
disk_low_watermark = 50
disk_path = \"$disk\""
in_ct systemctl restart fleet-agentd.service || { journal 50; fail "fleet-agentd did not restart"; }
for i in 1 2 3; do
    in_ct tee "/tmp/$dept.toml" >/dev/null <<TOML
id = "$dept"
image = "$repo:$i"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
    in_ct agentctl apply -f "/tmp/$dept.toml" >/dev/null || { journal 40; fail "apply of $repo:$i"; }
    until_ok 90 "$dept to run $repo:$i" runs "$repo:$i"
done
has_image "$repo:1" || fail "image 1 went before any pressure"
in_ct dd if=/dev/zero of="$disk/filler" bs=1M count=7 status=none
collected() { ! has_image "$repo:1"; }
until_ok 30 "image 1 to be collected" collected
for image in "$repo:2" "$repo:3" "$foreign" fleet-test-agent:1; do
    has_image "$image" || fail "$image was removed"
done
[ "$(metric fleet_agent_disk_pressure)" = 1 ] || fail "fleet_agent_disk_pressure is not 1"
events=$(in_ct agentctl events --after 0 --json)
grep -q '"disk_pressure"' <<<"$events" || fail "no disk_pressure event"
grep -q '"image_removed"' <<<"$events" || fail "no image_removed event"
in_ct rm -f "$disk/filler"
pressure_over() { [ "$(metric fleet_agent_disk_pressure)" = 0 ]; }
until_ok 30 "disk pressure to end" pressure_over
in_ct umount "$disk" || true

log "3. next_image announces image 4: pulled ahead, the container untouched, the update pulls nothing"
container_id() { in_ct agentctl status --json | python3 -c "
import json, sys
d = [r for r in json.load(sys.stdin)['departments'] if r['id'] == sys.argv[1]]
print(d[0]['container_id'] if d else '')" "$dept"; }
before=$(container_id)
[ -n "$before" ] || fail "$dept has no container"
has_image "$repo:4" && fail "image 4 is here before it was announced"
in_ct tee "/tmp/$dept.toml" >/dev/null <<TOML
id = "$dept"
image = "$repo:3"
next_image = "$repo:4"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
in_ct agentctl apply -f "/tmp/$dept.toml" >/dev/null || { journal 40; fail "apply announcing $repo:4"; }
pulled_ahead() { has_image "$repo:4"; }
until_ok 60 "image 4 to be pulled ahead" pulled_ahead
prepulled() { grep -q '"prepulled"' <<<"$(in_ct agentctl events --after 0 --json)"; }
until_ok 10 "the prepulled event" prepulled
sleep 2
[ "$(container_id)" = "$before" ] || fail "announcing next_image replaced the container"
runs "$repo:3" || fail "$dept no longer runs image 3"
in_ct tee "/tmp/$dept.toml" >/dev/null <<TOML
id = "$dept"
image = "$repo:4"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
in_ct agentctl apply -f "/tmp/$dept.toml" >/dev/null || { journal 40; fail "apply of $repo:4"; }
until_ok 90 "$dept to run $repo:4" runs "$repo:4"
in_ct agentctl events --after 0 --json | python3 -c "
import json, sys
pulls = [e for e in json.load(sys.stdin)['events'] if e['kind'] == 'pull_started' and sys.argv[1] in e['message']]
sys.exit(1 if pulls else 0)" "$repo:4" || fail "the update pulled the announced image again"
log "OK"

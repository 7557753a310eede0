#!/usr/bin/env bash
# Test 4: ansible-lint and --syntax-check pass; the role, run twice through
# site.yml against a clean Debian host (a systemd container made from the
# debootstrap root, reached with the community.docker.docker connection),
# installs and configures the agent, and the second run changes nothing.
# Before them, a run with a set the daemon would refuse stops, says why, and
# leaves the push playbook's containers alone. A WAL host's agent.toml is
# checked statically (rendered through the role's preview entry point).
# The host starts as the push playbook left it: two aio-<id> containers on the
# playbook's ports, which the agent must take over under the same names/ports.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
# This test's stand-in for the playbook's 8000: ports 47521-47530 are the pool,
# 47539 the API.
base=47520
depts=("$PKGTEST_NAME-hr" "$PKGTEST_NAME-fin")
# Sorts before the migrated ones: a pool department placed first must not take
# the ports they name (explicit host_ports are placed before pool ports).
extra=$PKGTEST_NAME-extra
token="role-test-token-$$-$RANDOM"
image=fleet-test-agent:1
work=$(mktemp -d)

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
    for d in "${depts[@]}" "$extra"; do docker rm -f "aio-$d" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT
cleanup; mkdir -p "$work"

log "ansible-lint, syntax check"
(cd "$PKGTEST_ROOT/ansible" && ansible-lint --nocolor -q) >"$work/lint.log" 2>&1 \
    || { cat "$work/lint.log" >&2; fail "ansible-lint failed"; }
(cd "$PKGTEST_ROOT/ansible" && ansible-playbook --syntax-check site.yml) >"$work/syntax.log" 2>&1 \
    || { cat "$work/syntax.log" >&2; fail "syntax check failed"; }

# A WAL host, statically (the systemd container has no PostgreSQL): the
# agent.toml the role renders points fleet-agentd at fleet-agent-wal.service's
# socket and passes check-config; the role enables that unit for a WAL target.
log "WAL host: rendered agent.toml"
(cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible localhost -m include_role \
    -a 'name=fleet_agent tasks_from=preview' -e fleet_agent_preview_dir="$work/wal" -e fleet_agent_preview_config="$work/wal/agent.toml" \
    -e fleet_agent_node_id="$node" -e fleet_agent_wal_target="file://$work/archive" \
    -e fleet_agent_wal_pg_wal_dir=/var/lib/postgresql/15/main/pg_wal -e fleet_agent_wal_backup_interval=24h) \
    >"$work/wal-preview.log" 2>&1 || { cat "$work/wal-preview.log" >&2; fail "rendering a WAL host's agent.toml failed"; }
walconf=$(sed -n '/^\[wal\]$/,$p' "$work/wal/agent.toml")
for line in "target = \"file://$work/archive\"" 'socket = "/run/fleet-agent-wal/wal.sock"' \
    'postgres = "host=/var/run/postgresql port=5432 user=postgres"' \
    'pg_wal_dir = "/var/lib/postgresql/15/main/pg_wal"' 'backup_interval = "24h"'; do
    grep -qxF "$line" <<<"$walconf" || { cat "$work/wal/agent.toml" >&2; fail "the role's [wal] lacks: $line"; }
done
"$PKGTEST_BIN_DIR/fleet-agentd" check-config --config-only --config "$work/wal/agent.toml" >"$work/wal-check.log" 2>&1 \
    || { cat "$work/wal-check.log" >&2; fail "check-config refuses the role's WAL agent.toml"; }
grep -qF 'name: fleet-agent-wal.service' "$PKGTEST_ROOT/ansible/roles/fleet_agent/tasks/service.yml" \
    || fail "the role does not manage fleet-agent-wal.service"

ensure_image
deb=$(ensure_deb)
docker image inspect "$image" >/dev/null 2>&1 || "$PKGTEST_ROOT/tests/images/build.sh" >&2
systemd_container_up "fleet-$PKGTEST_NAME"

# What deploy-app-server.yml left behind: aio-<id> on 8000 + loop.index.
for i in "${!depts[@]}"; do
    docker run -d --name "aio-${depts[$i]}" -p "127.0.0.1:$((base + i + 1)):8080" "$image" >/dev/null
done

cat >"$work/inventory.yml" <<YAML
app_servers:
  hosts:
    $SD_CT:
      ansible_connection: community.docker.docker
      ansible_python_interpreter: /usr/bin/python3
      # The container is entered as root and has no sudo; su root -> root asks nothing.
      ansible_become_method: su
YAML
cat >"$work/vars.yml" <<YAML
fleet_agent_deb_path: "$deb"
fleet_agent_node_id: "$node"
fleet_agent_ports_range: "$((base + 1))-$((base + 10))"
fleet_agent_api_listen: "127.0.0.1:$((base + 19))"
fleet_agent_api_token: "$token"
fleet_agent_push_image: "$image"
fleet_agent_push_port_base: $base
fleet_agent_push_departments:
  - { department_id: ${depts[0]}, db_password: "pw-one" }
  - { department_id: ${depts[1]}, db_password: "pw-two" }
fleet_agent_departments:
  - id: $extra
    image: "$image"
    env: { GREETING: "hello" }
    health: { interval: "2s", start_period: "0s" }
YAML

run_role() { # $1: log name; prints the PLAY RECAP line of the host
    (cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook -i "$work/inventory.yml" site.yml -e "@$work/vars.yml") \
        >"$work/$1.log" 2>&1 || { cat "$work/$1.log" >&2; fail "the role failed ($1)"; }
    grep -F 'pw-one' "$work/$1.log" && fail "a department secret appeared in the output of $1"
    grep -F "$token" "$work/$1.log" && fail "the API token appeared in the output of $1"
    grep -E "^$SD_CT +:" "$work/$1.log"
}
# A set the daemon would refuse (here: no memory left for departments) stops
# the role before anything reloads, and the push playbook's containers stay.
log "refused run"
pushed=$(docker inspect -f '{{ .Id }}' "aio-${depts[0]}" "aio-${depts[1]}")
rc=0
(cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook -i "$work/inventory.yml" site.yml \
    -e "@$work/vars.yml" -e fleet_agent_reserved_memory=1024TiB) >"$work/refused.log" 2>&1 || rc=$?
[ $rc -ne 0 ] || fail "the role succeeded with a desired state the daemon refuses"
grep -q "fleet-agentd would refuse this node's departments.*memory reservations would total" "$work/refused.log" \
    || { tail -30 "$work/refused.log" >&2; fail "the refused run did not say why"; }
grep -F 'pw-one' "$work/refused.log" && fail "a department secret appeared in the output of the refused run"
[ "$(docker inspect -f '{{ .Id }} {{ .State.Running }}' "aio-${depts[0]}" "aio-${depts[1]}" | awk '{ print $1 }')" = "$pushed" ] \
    && [ -z "$(docker inspect -f '{{ .State.Running }}' "aio-${depts[0]}" "aio-${depts[1]}" | grep -v true)" ] \
    || fail "the refused run touched the push playbook's containers"
log "first run"
recap1=$(run_role first)
log "$recap1"
grep -qE 'changed=[1-9]' <<<"$recap1" || fail "the first run changed nothing"
grep -qE 'failed=0' <<<"$recap1" || fail "the first run failed"
log "second run"
recap2=$(run_role second)
log "$recap2"
grep -qE 'changed=0 .*failed=0' <<<"$recap2" || {
    grep -B2 -A6 '^changed:' "$work/second.log" >&2 || true
    fail "the second run was not idempotent: $recap2"
}

# Installed and configured.
[ "$(in_ct dpkg-query -W -f '${Status}' fleet-agent)" = "install ok installed" ] || fail "package not installed"
[ "$(in_ct systemctl is-enabled fleet-agentd)" = enabled ] || fail "fleet-agentd not enabled"
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "fleet-agentd not running"
[ "$(in_ct stat -c '%a %U:%G' /etc/fleet-agent/api-token)" = "640 root:fleet-agent" ] || fail "api-token mode"
[ "$(in_ct cat /etc/fleet-agent/api-token)" = "$token" ] || fail "api-token content"
in_ct grep -qx "node_id = \"$node\"" /etc/fleet-agent/agent.toml || fail "agent.toml lacks node_id"
in_ct grep -qx 'token_file = "/etc/fleet-agent/api-token"' /etc/fleet-agent/agent.toml || fail "agent.toml lacks token_file"
for d in "${depts[@]}" "$extra"; do
    [ "$(in_ct stat -c '%a %U:%G' "/etc/fleet-agent/departments.d/$d.toml")" = "640 root:fleet-agent" ] \
        || fail "departments.d/$d.toml missing or with the wrong mode"
done
in_ct fleet-agentd check-config >/dev/null || fail "check-config fails on what the role wrote"

# The agent took the push playbook's containers over: same names, same ports,
# now its own (labelled), and healthy.
log "waiting for the agent to run the migrated departments"
for i in "${!depts[@]}"; do
    d=${depts[$i]} port=$((base + i + 1)) ok=""
    for _ in $(seq 1 90); do
        labels=$(docker inspect -f '{{ index .Config.Labels "fleet-agent.node" }} {{ .State.Running }}' "aio-$d" 2>/dev/null || true)
        if [ "$labels" = "$node true" ] && [ "$(docker port "aio-$d" 8080/tcp 2>/dev/null)" = "127.0.0.1:$port" ] \
            && python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2).status == 200 else 1)" 2>/dev/null; then
            ok=1; break
        fi
        sleep 1
    done
    [ -n "$ok" ] || { in_ct journalctl -u fleet-agentd --no-pager -n 40 >&2 || true; fail "aio-$d is not the agent's on 127.0.0.1:$port"; }
done
log "ok: lint clean, role idempotent, push-playbook containers taken over on their ports"

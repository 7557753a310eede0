#!/usr/bin/env bash
# Test 4: ansible-lint and --syntax-check pass; the role, run twice through
# site.yml against a clean Debian host (a systemd container made from the
# debootstrap root, reached with the community.docker.docker connection),
# installs and configures the agent, and the second run changes nothing.
# --check --diff passes on the fresh host (changing nothing) and reports no
# change on the converged one. The runs set API TLS, registry credentials,
# the containers' log driver and an administrator, and their effects are
# checked on the host (TLS handshake, LogConfig, group membership).
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
# An S3 WAL host: [wal.s3] and the credentials file the role writes.
log "S3 WAL host: rendered agent.toml"
(cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible localhost -m include_role \
    -a 'name=fleet_agent tasks_from=preview' -e fleet_agent_preview_dir="$work/s3" -e fleet_agent_preview_config="$work/s3/agent.toml" \
    -e fleet_agent_node_id="$node" -e fleet_agent_wal_target=s3://wal-bucket/app-1 \
    -e fleet_agent_wal_s3_endpoint=http://127.0.0.1:47700 -e fleet_agent_wal_s3_access_key_id=AKIAEXAMPLE \
    -e fleet_agent_wal_s3_secret_access_key=not-a-real-secret -e fleet_agent_wal_recovery_window=14d \
    -e fleet_agent_wal_pg_wal_dir=/var/lib/postgresql/15/main/pg_wal -e fleet_agent_wal_backup_interval=12h \
    -e fleet_agent_wal_verify_interval=7d \
    -e fleet_agent_docker_log_driver=local -e '{"fleet_agent_docker_log_options": {"max-size": "20m"}}') \
    >"$work/s3-preview.log" 2>&1 || { cat "$work/s3-preview.log" >&2; fail "rendering an S3 WAL host's agent.toml failed"; }
for line in 'target = "s3://wal-bucket/app-1"' 'recovery_window = "14d"' 'backup_interval = "12h"' \
    'verify_interval = "7d"' '[wal.s3]' \
    'endpoint = "http://127.0.0.1:47700"' 'credentials_file = "/etc/fleet-agent/s3-credentials"' \
    'log_driver = "local"' 'log_options = { "max-size" = "20m" }'; do
    grep -qxF "$line" "$work/s3/agent.toml" || { cat "$work/s3/agent.toml" >&2; fail "the role's S3 agent.toml lacks: $line"; }
done
! grep -q 'not-a-real-secret' "$work/s3/agent.toml" || fail "the S3 secret is in agent.toml"
"$PKGTEST_BIN_DIR/fleet-agentd" check-config --config-only --config "$work/s3/agent.toml" >"$work/s3-check.log" 2>&1 \
    || { cat "$work/s3-check.log" >&2; fail "check-config refuses the role's S3 agent.toml"; }
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
# API TLS with a self-signed certificate for 127.0.0.1; an administrator.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$work/api.key" -out "$work/api.crt" >"$work/openssl.log" 2>&1 \
    || { cat "$work/openssl.log" >&2; fail "openssl could not make a test certificate"; }
in_ct useradd --no-create-home alice
cat >"$work/vars.yml" <<YAML
fleet_agent_deb_path: "$deb"
fleet_agent_node_id: "$node"
fleet_agent_ports_range: "$((base + 1))-$((base + 10))"
fleet_agent_api_listen: "127.0.0.1:$((base + 19))"
fleet_agent_api_token: "$token"
fleet_agent_api_tls_cert: |
$(sed 's/^/  /' "$work/api.crt")
fleet_agent_api_tls_key: |
$(sed 's/^/  /' "$work/api.key")
fleet_agent_registry_auth:
  auths:
    "127.0.0.1:47701": { auth: "$(printf 'fleet:registry-pw' | base64)" }
fleet_agent_docker_log_driver: local
fleet_agent_docker_log_options: { max-size: "5m" }
fleet_agent_admins: [alice]
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
# --check --diff on the fresh host: no failure, and nothing changes.
log "check run on the fresh host"
(cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook --check --diff -i "$work/inventory.yml" site.yml -e "@$work/vars.yml") \
    >"$work/check-fresh.log" 2>&1 || { cat "$work/check-fresh.log" >&2; fail "--check --diff fails on a fresh host"; }
grep -E "^$SD_CT +:.* failed=0" "$work/check-fresh.log" >/dev/null || fail "--check on the fresh host: $(grep -E "^$SD_CT +:" "$work/check-fresh.log")"
! in_ct dpkg-query -W fleet-agent >/dev/null 2>&1 || fail "--check installed the package"
grep -F "$token" "$work/check-fresh.log" && fail "the API token appeared in the --diff output"
grep -F 'BEGIN PRIVATE KEY' "$work/check-fresh.log" && fail "the TLS key appeared in the --diff output"

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

log "check run on the converged host"
(cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook --check --diff -i "$work/inventory.yml" site.yml -e "@$work/vars.yml") \
    >"$work/check-converged.log" 2>&1 || { cat "$work/check-converged.log" >&2; fail "--check --diff fails on the converged host"; }
recap3=$(grep -E "^$SD_CT +:" "$work/check-converged.log")
log "$recap3"
grep -qE 'changed=0 .*failed=0' <<<"$recap3" || {
    grep -B2 -A12 '^changed:' "$work/check-converged.log" >&2 || true
    fail "--check --diff reports changes on the converged host: $recap3"
}
grep -F 'pw-one' "$work/check-converged.log" && fail "a department secret appeared in the --diff output"

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
[ "$(in_ct stat -c '%a %U:%G' /etc/fleet-agent/api-tls.key)" = "640 root:fleet-agent" ] || fail "api-tls.key mode"
[ "$(in_ct stat -c '%a %U:%G' /etc/fleet-agent/registry-auth.json)" = "640 root:fleet-agent" ] || fail "registry-auth.json mode"
for line in 'tls_cert = "/etc/fleet-agent/api-tls.crt"' 'tls_key = "/etc/fleet-agent/api-tls.key"' \
    'registry_auth_file = "/etc/fleet-agent/registry-auth.json"' 'log_driver = "local"' 'log_options = { "max-size" = "5m" }'; do
    in_ct grep -qxF "$line" /etc/fleet-agent/agent.toml || fail "agent.toml lacks: $line"
done
in_ct python3 -c 'import json,sys; a=json.load(open("/etc/fleet-agent/registry-auth.json")); sys.exit(0 if "127.0.0.1:47701" in a["auths"] else 1)' \
    || fail "registry-auth.json is not Docker's config.json shape"
in_ct id -nG alice | tr ' ' '\n' | grep -qx fleet-agent || fail "alice is not in the fleet-agent group"
# The API speaks TLS with the role's certificate (the token is still required).
python3 - "$work/api.crt" "$((base + 19))" "$token" <<'PY' || fail "the API does not answer over TLS with the role's certificate"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
req = urllib.request.Request(f"https://127.0.0.1:{sys.argv[2]}/v1/node", headers={"Authorization": f"Bearer {sys.argv[3]}"})
sys.exit(0 if urllib.request.urlopen(req, context=ctx, timeout=5).status == 200 else 1)
PY

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
    [ "$(docker inspect -f '{{ .HostConfig.LogConfig.Type }} {{ index .HostConfig.LogConfig.Config "max-size" }}' "aio-$d")" = "local 5m" ] \
        || fail "aio-$d does not log with the role's log driver: $(docker inspect -f '{{ json .HostConfig.LogConfig }}' "aio-$d")"
done
log "ok: lint clean, role idempotent, push-playbook containers taken over on their ports"

#!/usr/bin/env bash
# The role configures an S3 WAL host, for real (issue 14): site.yml runs the
# fleet_agent role against a systemd container with Debian's postgresql-15
# (cluster 15/main, started), with a WAL target on S3 (moto on the host's
# loopback, a bucket the operator made), the credentials the role installs,
# pg_wal_dir, backup_interval, recovery_window and object_checksum = "sha256"
# (fleet_agent_wal_object_checksum, issue 13). The role leaves
# PostgreSQL's own configuration to the operator (it would have to restart the
# database); that is docs/wal.md's step 3, done here word for word after the
# role. Then, as an operator: `agentctl wal status` is healthy (the archive
# answers, no failures), a segment closed by `SELECT pg_switch_wal()` lands in
# the bucket (listed with boto3, not through the agent) as an FWAL1 object (its
# header read from the bucket), and `agentctl backup
# create` puts a base backup there. Last, the role again (applied, then with
# --check --diff) on the converged host changes nothing and restarts nothing.
#
# Kept apart from ansible-role.sh (the longest scenario) so both run in
# parallel. Deviations from the docs, forced by the shared host network:
# PostgreSQL on 44510 instead of 5432, archive_timeout 5s.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
# Ports 44501-44504 (the pool), 44509 (the API), 44510 (PostgreSQL), 44511 (moto);
# FLEET_PKGTEST_PORT_BASE (default 44500) moves them all, so that a run beside
# the suite's own can keep to another range.
port_base=${FLEET_PKGTEST_PORT_BASE:-44500}
pg_port=$((port_base + 10))
moto_port=$((port_base + 11))
moto=/opt/moto/bin/moto_server
moto_py=/opt/moto/bin/python
bucket=$(tr -c 'a-z0-9\n' - <<<"${PKGTEST_NAME,,}" | cut -c1-40)-wal
prefix=app-1
secret="s3-secret-$$-$RANDOM"
work=$(mktemp -d)
moto_pid=""

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
    [ -z "$moto_pid" ] || kill "$moto_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cleanup; mkdir -p "$work"

[ -x "$moto" ] || fail "$moto is missing; run scripts/test.sh (it installs moto) first"
ensure_image
deb=$(ensure_deb)

psql_at() { in_ct runuser -u postgres -- psql -h /var/run/postgresql -p "$pg_port" -d postgres -XAtqc "$1"; }
s3() { # python code run with `s3` a boto3 client on moto, `bucket`, `prefix` set
    "$moto_py" - "$moto_port" "$bucket" "$prefix" "$1" <<'PY'
import sys, boto3
port, bucket, prefix, code = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
def keys():
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out
exec(code)
PY
}

log "moto on 127.0.0.1:$moto_port, bucket $bucket"
"$moto" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
wal_wait_for 60 "moto did not come up on $moto_port" s3 'pass'
s3 's3.create_bucket(Bucket=bucket)' || fail "cannot create the bucket"

systemd_container_up "fleet-$PKGTEST_NAME"
# Debian's cluster as the package made it, on this test's port (the role installs the .deb).
wal_host_up $pg_port

cat >"$work/inventory.yml" <<YAML
app_servers:
  hosts:
    $SD_CT:
      ansible_connection: community.docker.docker
      ansible_python_interpreter: /usr/bin/python3
      ansible_become_method: su
YAML
cat >"$work/vars.yml" <<YAML
fleet_agent_deb_path: "$deb"
fleet_agent_node_id: "$node"
fleet_agent_ports_range: "$((port_base + 1))-$((port_base + 4))"
fleet_agent_api_listen: "127.0.0.1:$((port_base + 9))"
fleet_agent_wal_target: "s3://$bucket/$prefix"
fleet_agent_wal_postgres: "host=/var/run/postgresql port=$pg_port user=postgres"
fleet_agent_wal_pg_wal_dir: /var/lib/postgresql/15/main/pg_wal
fleet_agent_wal_backup_interval: 24h
fleet_agent_wal_recovery_window: 14d
fleet_agent_wal_object_checksum: sha256
fleet_agent_wal_s3_endpoint: "http://127.0.0.1:$moto_port"
fleet_agent_wal_s3_access_key_id: test
fleet_agent_wal_s3_secret_access_key: "$secret"
YAML

log "the role"
start=$(date +%s)
(cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook -i "$work/inventory.yml" site.yml -e "@$work/vars.yml") \
    >"$work/role.log" 2>&1 || { cat "$work/role.log" >&2; fail "the role failed on the WAL host"; }
log "$(grep -E "^$SD_CT +:" "$work/role.log") ($(( $(date +%s) - start )) s)"
grep -qF "$secret" "$work/role.log" && fail "the S3 secret appeared in the role's output"

# What the role wrote.
for line in "target = \"s3://$bucket/$prefix\"" 'socket = "/run/fleet-agent-wal/wal.sock"' \
    'pg_wal_dir = "/var/lib/postgresql/15/main/pg_wal"' 'backup_interval = "24h"' 'recovery_window = "14d"' \
    'object_checksum = "sha256"' \
    '[wal.s3]' "endpoint = \"http://127.0.0.1:$moto_port\"" 'credentials_file = "/etc/fleet-agent/s3-credentials"'; do
    in_ct grep -qxF "$line" /etc/fleet-agent/agent.toml || { in_ct cat /etc/fleet-agent/agent.toml >&2; fail "agent.toml lacks: $line"; }
done
in_ct grep -qF "$secret" /etc/fleet-agent/agent.toml && fail "the S3 secret is in agent.toml"
[ "$(in_ct stat -c '%a %U:%G' /etc/fleet-agent/s3-credentials)" = "600 root:root" ] || fail "s3-credentials mode"
in_ct grep -qxF "secret_access_key = \"$secret\"" /etc/fleet-agent/s3-credentials || fail "s3-credentials lacks the secret"
in_ct runuser -u postgres -- cat /etc/fleet-agent/s3-credentials >/dev/null 2>&1 && fail "postgres can read the S3 credentials"
for unit in fleet-agent-wal fleet-agentd; do
    [ "$(in_ct systemctl is-enabled $unit)" = enabled ] || fail "$unit is not enabled"
    [ "$(in_ct systemctl is-active $unit)" = active ] || { wal_journal; fail "$unit is not running"; }
done

# docs/wal.md, step 3: the operator's part, after the role.
log "docs/wal.md step 3: archive_command, restart PostgreSQL"
wal_archiving_on 5s

log "agentctl backup create"
out=$(in_ct agentctl backup create 2>&1) || { wal_journal; fail "agentctl backup create: $out"; }
grep -q 'base backup .* taken' <<<"$out" || fail "backup create said: $out"
[ "$(in_ct agentctl backup list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -ge 1 ] \
    || fail "no base backup listed"
s3 'sys.exit(0 if any("/backups/" in k for k in keys()) else 1)' \
    || fail "no base backup object in the bucket: $(s3 'print(keys())')"

log "SELECT pg_switch_wal()"
psql_at "CREATE TABLE marks AS SELECT g AS id FROM generate_series(1, 10000) g" >/dev/null
segment=$(psql_at 'SELECT pg_walfile_name(pg_current_wal_lsn())')
psql_at 'SELECT pg_switch_wal()' >/dev/null
in_bucket() { s3 "sys.exit(0 if any(k.endswith('/wal/$segment.zst') for k in keys()) else 1)"; }
wal_wait_for 60 "segment $segment is not in s3://$bucket/$prefix" in_bucket
log "segment $segment is in the bucket"
# fleet_agent_wal_object_checksum: sha256 made it an FWAL1 object: its header,
# read from the bucket, not through the agent.
header=$(s3 "import re
key = next(k for k in keys() if k.endswith('/wal/$segment.zst'))
head = s3.get_object(Bucket=bucket, Key=key, Range='bytes=0-70')['Body'].read()
print(head[:5].decode() if re.fullmatch(rb'FWAL[12] [0-9a-f]{64}\\n', head) else repr(head))") \
    || fail "cannot read the header of $segment from the bucket"
[ "$header" = FWAL1 ] || fail "$segment in the bucket is not FWAL1 with object_checksum = \"sha256\": $header"
log "segment $segment is an FWAL1 object"

out=$(in_ct agentctl wal status 2>&1) || { wal_journal; fail "agentctl wal status: $out"; }
grep -q "target: *s3://$bucket/$prefix" <<<"$out" || fail "wal status does not show the S3 target: $out"
status=$(in_ct agentctl wal status --json) || fail "agentctl wal status --json failed"
python3 - "$status" <<'PY' || fail "wal status is not healthy: $status"
import json, sys
d = json.loads(sys.argv[1])
assert d["archive"]["reachable"] is True, d["archive"]
assert d["pushed_segments"] > 0, d
assert not any(d.get("failures", {}).values()), d.get("failures")
PY
[ "$(psql_at 'SELECT failed_count FROM pg_stat_archiver')" = 0 ] || { wal_journal; fail "archive_command failed"; }
# A converged WAL host: the role again changes nothing and restarts nothing
# (the WAL service would drop in-flight pushes), with and without --check.
wal_pid=$(in_ct systemctl show -p MainPID --value fleet-agent-wal)
for mode in "" "--check --diff"; do
    # shellcheck disable=SC2086 # $mode is two words or none
    (cd "$PKGTEST_ROOT/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook -i "$work/inventory.yml" site.yml -e "@$work/vars.yml" $mode) \
        >"$work/role-again.log" 2>&1 || { cat "$work/role-again.log" >&2; fail "the role failed on a converged WAL host (${mode:-apply})"; }
    recap=$(grep -E "^$SD_CT +:" "$work/role-again.log")
    grep -qE 'changed=0 .*failed=0' <<<"$recap" || { cat "$work/role-again.log" >&2; fail "the role changed a converged WAL host (${mode:-apply}): $recap"; }
    grep -qF "$secret" "$work/role-again.log" && fail "the S3 secret appeared in the role's output (${mode:-apply})"
done
[ "$(in_ct systemctl show -p MainPID --value fleet-agent-wal)" = "$wal_pid" ] || fail "the second role run restarted fleet-agent-wal"
log "the role again: changed=0, with and without --check, fleet-agent-wal not restarted"

log "ok: the role's S3 WAL host archives $segment to s3://$bucket/$prefix and takes base backups there"

#!/usr/bin/env bash
# As installed: an S3 archive behind a private CA (issue 13). In the package
# tests' systemd container, next to Debian's postgresql-15: a private CA and a
# leaf certificate (CA:FALSE, subjectAltName IP:127.0.0.1) made with openssl,
# HAProxy terminating TLS with that leaf in front of moto on the host's
# loopback, and `[wal.s3] ca_file` set by following docs/wal.md word for word
# (the CA at /etc/ssl/fleet-agent/s3-ca.pem, mode 0644; the credentials in
# /etc/fleet-agent/s3-credentials). Shown: the WAL service (User=postgres, in
# its sandbox) archives a segment (pg_switch_wal) and a base backup into the
# bucket (read back with boto3 over the same TLS), `agentctl doctor`'s archive
# check is ok; with ca_file removed the archive fails and `agentctl wal
# status`, `agentctl doctor` and PostgreSQL's log (archive_command's stderr)
# name the certificate; a wrong ca_file path, and the CA put in
# /etc/fleet-agent (which postgres cannot read), stop the WAL service at start
# with a journal line naming the file; with the CA back, archiving resumes.
#
# Last, `verify_interval` (issue 13): a scheduled verify over that TLS, its
# result in fleet-agentd's /metrics, kept across a restart of the WAL service.
#
# Deviations from the docs, forced by the test rig: the cluster listens on
# 44200 (the container shares the host's network), the store is moto behind
# HAProxy on 127.0.0.1 instead of MinIO or Ceph RGW on a LAN, and
# verify_interval is 1m (its least) so the test waits one minute.
source "$(dirname "$0")/lib.sh"
# No `cmd | grep -q` below: grep -q exits at the first match, cmd may then die of
# SIGPIPE, and pipefail turns a match into a failure.

node=$PKGTEST_NAME
# Ports 44200-44209: PostgreSQL 44200 (15/main), the department pool
# 44201-44204, the API 44205, moto 44206 (plain HTTP, loopback only), HAProxy's
# TLS front 44207. FLEET_PKGTEST_PORT_BASE (default 44200) moves them all, so
# that a run beside the suite's own can keep to another range.
port_base=${FLEET_PKGTEST_PORT_BASE:-44200}
pg_port=$port_base
api=127.0.0.1:$((port_base + 5))
moto_port=$((port_base + 6))
tls_port=$((port_base + 7))
endpoint="https://127.0.0.1:$tls_port"
moto=/opt/moto/bin/moto_server
moto_python=/opt/moto/bin/python
moto_pid=""
haproxy_pid=""
work=$(mktemp -d)
ensure_image
deb=$(ensure_deb)

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
    [ -z "$haproxy_pid" ] || kill "$haproxy_pid" 2>/dev/null || true
    [ -z "$moto_pid" ] || kill "$moto_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
systemd_container_down
remove_node_containers "$node"

[ -x "$moto" ] || fail "$moto is missing; run scripts/test.sh (it installs moto) first"
command -v haproxy >/dev/null || fail "haproxy is missing; run scripts/test.sh (it installs haproxy) first"

# --- The private CA and the store's leaf certificate, as an operator of a LAN
# store would make them. The leaf is CA:FALSE with the endpoint's IP in
# subjectAltName: rustls refuses a CA certificate used as the server's own.
log "making a private CA and a leaf for 127.0.0.1"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fleet test private CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null || fail "openssl: the CA"
openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 \
    -keyout "$work/leaf-key.pem" -out "$work/leaf.csr" 2>/dev/null || fail "openssl: the leaf's request"
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n' >"$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" -CAcreateserial \
    -days 2 -extfile "$work/leaf.ext" -out "$work/leaf.pem" 2>/dev/null || fail "openssl: signing the leaf"
openssl verify -CAfile "$work/ca.pem" "$work/leaf.pem" >/dev/null || fail "the leaf does not verify against the CA"
cat "$work/leaf.pem" "$work/leaf-key.pem" >"$work/haproxy.pem"

# --- The store: moto on the loopback, HAProxy's TLS in front of it (moto's own
# TLS, werkzeug's, closes connections without close_notify; see bench/wal.sh).
log "moto on 127.0.0.1:$moto_port behind HAProxy TLS on $tls_port"
"$moto" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
cat >"$work/haproxy.cfg" <<CFG
global
  maxconn 256
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend s3
  bind 127.0.0.1:$tls_port ssl crt $work/haproxy.pem
  default_backend moto
backend moto
  server moto 127.0.0.1:$moto_port
CFG
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
store_up() { curl -fsS --cacert "$work/ca.pem" -X PUT -o /dev/null "$endpoint/pg-archive"; }
for _ in $(seq 1 120); do store_up 2>/dev/null && break; sleep 0.5; done
store_up || { cat "$work/moto.log" "$work/haproxy.log" >&2; fail "the TLS store did not come up on $tls_port"; }
# A client without the CA refuses the store: the test would prove nothing if it did not.
curl -fsS -o /dev/null "$endpoint/" 2>/dev/null && fail "curl trusts the private CA's leaf without the CA"

# boto3 (moto's venv) over the same TLS, trusting only the private CA.
s3_keys() { # PREFIX: the keys under it, one a line
    "$moto_python" - "$endpoint" "$work/ca.pem" "$1" <<'PY'
import sys, boto3
endpoint, ca, prefix = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca, region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="pg-archive", Prefix=prefix):
    for o in page.get("Contents", []):
        print(o["Key"])
PY
}

systemd_container_up "fleet-$PKGTEST_NAME"

wal_host_up $pg_port "$deb"

# --- Set-up, word for word as docs/wal.md says (the port aside).
# "put the CA's certificate (PEM; a CA certificate is public) in
# /etc/ssl/fleet-agent/s3-ca.pem, mode 0644, and set ca_file to it"
in_ct install -d -m 0755 /etc/ssl/fleet-agent
in_ct sh -c 'cat >/etc/ssl/fleet-agent/s3-ca.pem' <"$work/ca.pem"
in_ct chmod 0644 /etc/ssl/fleet-agent/s3-ca.pem
# "keep the credentials in /etc/fleet-agent/s3-credentials (mode 0600, owner root)"
in_ct sh -c 'umask 077; printf "access_key_id = test\nsecret_access_key = test\n" >/etc/fleet-agent/s3-credentials'
s3_section=$(cat <<TOML
[wal.s3]
endpoint = "$endpoint"
region = "us-east-1"
credentials_file = "/etc/fleet-agent/s3-credentials"
ca_file = "/etc/ssl/fleet-agent/s3-ca.pem"
TOML
)
wal_agent_toml s3://pg-archive/app-1 /var/lib/postgresql/15/main/pg_wal "$s3_section"
# Step 2 with ca_file; the WAL service that talks TLS is postgres, sandboxed,
# without capabilities (lib.sh). Step 3.
wal_service_up
wal_archiving_on 60s
in_ct runuser -u postgres -- cat /etc/fleet-agent/s3-credentials >/dev/null 2>&1 && fail "postgres can read the S3 credentials"

sysid=$(in_ct agentctl wal status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["system_identifier"])') \
    || fail "wal status has no system identifier"
[ -n "$sysid" ] && [ "$sysid" != None ] || fail "wal status has no system identifier"

failed_count() { psql_at $pg_port 'SELECT failed_count FROM pg_stat_archiver'; }

# --- With the CA: a segment and a base backup reach the bucket.
log "with ca_file: pg_switch_wal and agentctl backup create"
psql_at $pg_port "CREATE TABLE marks (id serial PRIMARY KEY); INSERT INTO marks SELECT FROM generate_series(1, 100)" >/dev/null
segment=$(psql_at $pg_port 'SELECT pg_walfile_name(pg_current_wal_lsn())')
psql_at $pg_port 'SELECT pg_switch_wal()' >/dev/null
in_bucket() { grep -qx "$1" <<<"$(s3_keys "app-1/$sysid/")"; }
wal_wait_for 60 "$segment did not reach the bucket" in_bucket "app-1/$sysid/wal/$segment.zst"
[ "$(failed_count)" = 0 ] || { wal_journal; fail "archive_command failed against the TLS store with ca_file set"; }
out=$(in_ct agentctl backup create 2>&1) || { wal_journal; fail "agentctl backup create over TLS: $out"; }
backup=$(in_ct agentctl backup list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
keys=$(s3_keys "app-1/$sysid/backups/$backup/")
grep -qx "app-1/$sysid/backups/$backup/base.tar.zst" <<<"$keys" || fail "no base.tar.zst of $backup in the bucket: $keys"
grep -qx "app-1/$sysid/backups/$backup/manifest.json" <<<"$keys" || fail "no manifest of $backup in the bucket: $keys"
log "bucket holds $segment and backup $backup ($(s3_keys "app-1/$sysid/" | wc -l) objects)"
# doctor exits non-zero for checks this container cannot pass (clock sync):
# only its archive line is judged here.
doctor=$(in_ct agentctl doctor 2>&1 || true)
grep -qE "^ok +archive +s3://pg-archive/app-1 answers" <<<"$doctor" || fail "doctor's archive check with ca_file: $doctor"

# --- Without the CA: the store's leaf is not trusted, and the operator is told so.
log "without ca_file"
in_ct sed -i '/^ca_file = /d' /etc/fleet-agent/agent.toml
in_ct systemctl restart fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not restart without ca_file"; }
names_certificate() { grep -qiE 'certificate|UnknownIssuer|tls' <<<"$1"; }
status=$(in_ct agentctl wal status 2>&1 || true)
log "agentctl wal status without ca_file: $(grep -i 'archive' <<<"$status" | head -3 | tr '\n' ' ')"
names_certificate "$status" || fail "wal status without ca_file does not name the certificate: $status
$(in_ct agentctl wal status --json 2>&1 || true)"
doctor=$(in_ct agentctl doctor 2>&1 || true)
line=$(grep -E ' archive ' <<<"$doctor" || true)
grep -qE '^FAIL +archive' <<<"$line" || fail "doctor's archive check passed without ca_file: $doctor"
names_certificate "$line" || fail "doctor's archive check does not name the certificate: $line"
log "doctor: $line"
before_failed=$(failed_count)
# Written (and committed) first: right after a switch (the base backup's) the
# write position is on a segment boundary, where pg_walfile_name names the
# previous, already archived segment.
psql_at $pg_port "INSERT INTO marks SELECT FROM generate_series(1, 100)" >/dev/null
stuck=$(psql_at $pg_port 'SELECT pg_walfile_name(pg_current_wal_lsn())')
psql_at $pg_port 'SELECT pg_switch_wal()' >/dev/null
more_failed() { [ "$(failed_count)" -gt "$before_failed" ]; }
wal_wait_for 60 "archive_command did not fail without ca_file" more_failed
in_bucket "app-1/$sysid/wal/$stuck.zst" && fail "$stuck reached the bucket without ca_file"
pglog=$(in_ct tail -n 60 /var/log/postgresql/postgresql-15-main.log)
names_certificate "$pglog" || fail "PostgreSQL's log does not name the certificate: $pglog"
log "PostgreSQL's log: $(grep -iE 'certificate' <<<"$pglog" | tail -1)"

# --- A wrong path, a file without a certificate, and the CA where docs/wal.md
# says not to put it: `fleet-agentd check-config` (as root, before the
# restart) refuses each naming the field and the file, and so does the WAL
# service's start.
refused_at_start() { # PATH WHAT CHECK: fleet-agent-wal must not start with ca_file = PATH
    in_ct sed -i "/^credentials_file = /a ca_file = \"$1\"" /etc/fleet-agent/agent.toml
    local out rc=0
    out=$(in_ct fleet-agentd check-config 2>&1) || rc=$?
    [ "$rc" = 64 ] || fail "check-config exited $rc with ca_file $1 ($3): $out"
    grep -q "^fleet-agentd: wal.s3.ca_file $1: .*$3" <<<"$out" || fail "check-config does not name ca_file $1 and '$3': $out"
    log "check-config: $(grep "wal.s3.ca_file" <<<"$out")"
    # The unit's ExecStartPre (--config-only, as fleet-agent) leaves it to the
    # WAL service: fleet-agentd does not read it and keeps supervising.
    in_ct runuser -u fleet-agent -- fleet-agentd check-config --config-only >/dev/null \
        || fail "check-config --config-only refused ca_file $1, which only the WAL service reads"
    in_ct systemctl restart fleet-agent-wal >/dev/null 2>&1 && fail "fleet-agent-wal started with ca_file $1 ($2)"
    # The refusal can reach the journal after systemctl reports the failed start.
    wal_wait_for 10 "the journal does not name ca_file $1 and '$2'" \
        in_journal "wal.s3.ca_file $1: .*$2" -u fleet-agent-wal -n 60
    log "refused: $(grep -o "wal.s3.ca_file $1: .*$2[^\"]*" <<<"$(in_ct journalctl -u fleet-agent-wal --no-pager -n 60 -o cat)" | tail -1)"
    # Restart=on-failure keeps trying; stop it before StartLimitBurst is spent.
    in_ct systemctl stop fleet-agent-wal
    in_ct systemctl reset-failed fleet-agent-wal
    in_ct sed -i '/^ca_file = /d' /etc/fleet-agent/agent.toml
}
refused_at_start /etc/ssl/fleet-agent/missing.pem 'No such file' 'cannot read: No such file'
in_ct sh -c 'printf "access_key_id = not a certificate\n" >/etc/ssl/fleet-agent/not-a-ca.pem; chmod 0644 /etc/ssl/fleet-agent/not-a-ca.pem'
refused_at_start /etc/ssl/fleet-agent/not-a-ca.pem 'no PEM certificate' 'no PEM certificate in it'
in_ct install -m 0644 /etc/ssl/fleet-agent/s3-ca.pem /etc/fleet-agent/s3-ca.pem
refused_at_start /etc/fleet-agent/s3-ca.pem 'Permission denied' "user postgres cannot search /etc/fleet-agent (mode 0750, root:fleet-agent)"

# --- The CA back: the segment PostgreSQL kept retrying reaches the bucket.
# And verify on a schedule (verify_interval; 1m, its least, so the test waits
# one minute): the WAL service walks and reads back the archive over TLS itself.
log "ca_file back, verify_interval 1m"
in_ct sed -i '/^credentials_file = /a ca_file = "/etc/ssl/fleet-agent/s3-ca.pem"' /etc/fleet-agent/agent.toml
in_ct sed -i '/^pg_wal_dir = /a verify_interval = "1m"' /etc/fleet-agent/agent.toml
in_ct fleet-agentd check-config >/dev/null || fail "check-config refused verify_interval"
in_ct systemctl restart fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not start with ca_file back"; }
wal_wait_for 90 "$stuck did not reach the bucket once ca_file was back" in_bucket "app-1/$sysid/wal/$stuck.zst"
doctor=$(in_ct agentctl doctor 2>&1 || true)
grep -qE "^ok +archive" <<<"$doctor" || fail "doctor's archive check with ca_file back: $doctor"

metrics() { api_get "$api" /metrics; }
verified() { grep -qE '^fleet_agent_wal_verify_ok 1$' <<<"$(metrics)"; }
grep -q '^fleet_agent_wal_verify_ok' <<<"$(metrics)" && fail "a verify result before any verify ran"
wal_wait_for 120 "no scheduled verify (verify_interval 1m) reached fleet-agentd's /metrics" verified
wal_wait_for 10 "no scheduled verify in fleet-agent-wal's journal" \
    in_journal 'Scheduled verify: the archive is complete' -u fleet-agent-wal
[ "$(in_ct stat -c '%U' /var/lib/fleet-agent-wal/wal-verify-last.json)" = postgres ] \
    || fail "the WAL service kept no verify result"
at=$(grep -E '^fleet_agent_wal_verify_timestamp_seconds ' <<<"$(metrics)" | cut -d' ' -f2)
# A restart keeps the result (and the schedule): the new process, asked on its
# own socket (fleet-agentd's relay could still hold the old one's), shows the
# same verify at once, a minute before its next one is due.
wal_metrics() {
    in_ct python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect("/run/fleet-agent-wal/wal.sock")
s.sendall(b"GET /metrics HTTP/1.0\r\nHost: wal\r\n\r\n"); print(s.makefile("rb").read().decode())'
}
in_ct systemctl restart fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not restart"; }
after=$(wal_metrics)
grep -qxF "fleet_agent_wal_verify_timestamp_seconds $at" <<<"$after" \
    && grep -qxF 'fleet_agent_wal_verify_ok 1' <<<"$after" \
    || fail "the verify result did not survive a restart of fleet-agent-wal (was $at): $(grep verify <<<"$after")"

# --- A CA in a directory whose mode bits close it to postgres, opened to it by
# a POSIX ACL (`setfacl -m u:postgres:x /srv/fleet-ca`, written here with
# python3: this root has no acl package): check-config judges the ACL as the
# kernel does, refusing before it and accepting after, and the WAL service
# archives through that CA.
log "ca_file behind a POSIX ACL"
in_ct install -d -m 0700 /srv/fleet-ca
in_ct install -m 0644 /etc/ssl/fleet-agent/s3-ca.pem /srv/fleet-ca/s3-ca.pem
in_ct sed -i 's|^ca_file = .*|ca_file = "/srv/fleet-ca/s3-ca.pem"|' /etc/fleet-agent/agent.toml
rc=0; out=$(in_ct fleet-agentd check-config 2>&1) || rc=$?
[ "$rc" = 64 ] || fail "check-config exited $rc with the CA in a 0700 directory: $out"
grep -q "wal.s3.ca_file /srv/fleet-ca/s3-ca.pem: the WAL service's user postgres cannot search /srv/fleet-ca (mode 0700, root:root)" <<<"$out" \
    || fail "check-config does not name /srv/fleet-ca: $out"
in_ct python3 -c 'import os, pwd, struct
uid, undefined = pwd.getpwnam("postgres").pw_uid, 0xFFFFFFFF
entries = [(0x01, 7, undefined), (0x02, 1, uid), (0x04, 0, undefined), (0x10, 1, undefined), (0x20, 0, undefined)]
os.setxattr("/srv/fleet-ca", "system.posix_acl_access", struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries))'
in_ct runuser -u postgres -- cat /srv/fleet-ca/s3-ca.pem >/dev/null || fail "the ACL does not let postgres read the CA (the kernel says)"
out=$(in_ct fleet-agentd check-config 2>&1) || fail "check-config refused a CA the ACL lets postgres read: $out"
in_ct systemctl restart fleet-agent-wal || { wal_journal; fail "fleet-agent-wal did not start with the CA behind an ACL"; }
psql_at $pg_port "INSERT INTO marks SELECT FROM generate_series(1, 100)" >/dev/null
behind_acl=$(psql_at $pg_port 'SELECT pg_walfile_name(pg_current_wal_lsn())')
psql_at $pg_port 'SELECT pg_switch_wal()' >/dev/null
wal_wait_for 60 "$behind_acl did not reach the bucket with the CA behind an ACL" in_bucket "app-1/$sysid/wal/$behind_acl.zst"
log "ok: archive over a private CA's TLS as installed; scheduled verify at $at; a CA behind an ACL accepted and used"

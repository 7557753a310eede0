#!/usr/bin/env bash
# As installed: the progress of base backups and restores (issue 14), next to
# Debian's postgresql-15 with fleet-agent-wal.service set up by following
# docs/wal.md, in the package tests' systemd container. Under
# `[wal] backup_max_rate` a base backup of a pgbench cluster lasts long enough
# to be watched:
# - `agentctl backup create` into a pipe prints plain progress lines (bytes
#   growing, a total, a rate) and no terminal codes;
# - meanwhile fleet-agentd's GET /v1/wal (TCP API, token) shows `progress` with
#   done_bytes growing and total_bytes set, and `agentctl wal status` its line;
#   once the backup is over, no progress is left;
# - a second backup on a pseudo-terminal (`script`) draws a bar;
# - `agentctl restore` into a new cluster's directory (as docs/wal.md says)
#   prints no terminal codes into a pipe, and its progress lines, if the restore
#   lasts long enough for one, have the same form.
#
# Deviations from the docs, forced by the test rig: the cluster listens on port
# 44600 instead of 5432 (the container shares the host's network), and
# backup_max_rate is small ("4MiB") so a backup of a small cluster lasts > 10 s.
source "$(dirname "$0")/lib.sh"
# No `cmd | grep -q` below: grep -q exits at the first match, cmd may then die of
# SIGPIPE, and pipefail turns a match into a failure.

node=$PKGTEST_NAME
# Ports 44600-44609: PostgreSQL 44600 (15/main) and 44601 (15/restored), the
# department pool 44602-44605, the API 44606, docker-registry 44607 and the
# slow link to it 44608.
pg_port=44600
restored_port=44601
api=127.0.0.1:44606
registry_port=44607
slow_port=44608
registry_pid=""
relay_pid=""
pulled_image=""
# pgbench -i -s 4: ~60 MiB of tables and indexes, ~85 MiB of data directory;
# at 4 MiB/s a base backup lasts ~20 s.
scale=4
max_rate=4MiB
ensure_image
deb=$(ensure_deb)
work=""

cleanup() {
    systemd_container_down
    remove_node_containers "$node"
    [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true
    [ -z "$relay_pid" ] || kill "$relay_pid" 2>/dev/null || true
    [ -z "$pulled_image" ] || docker rmi "$pulled_image" >/dev/null 2>&1 || true
    [ -z "$work" ] || rm -rf "$work"
}
trap cleanup EXIT
cleanup
work=$(mktemp -d "$PKGTEST_CACHE/progress.XXXXXX")
systemd_container_up "fleet-$PKGTEST_NAME"

journal() { in_ct journalctl -u "$1" --no-pager -n "${2:-40}" >&2 || true; }
elapsed() { printf '%d.%03d' $(( ($(date +%s%N) - $1) / 1000000000 )) $(( ($(date +%s%N) - $1) / 1000000 % 1000 )); }

# --- Debian's cluster 15/main, then the set-up as docs/wal.md says (the port aside).
in_ct sed -i "s/^port = 5432/port = $pg_port/" /etc/postgresql/15/main/postgresql.conf
in_ct systemctl start postgresql || { journal postgresql@15-main; fail "postgresql did not start"; }
ct_install_deb "$deb"
rate_line=""
[ -z "$max_rate" ] || rate_line="backup_max_rate = \"$max_rate\""
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "44602-44605"
[api]
listen = "$api"
[wal]
target = "file:///var/backups/fleet-agent"
socket = "/run/fleet-agent-wal/wal.sock"
postgres = "host=/var/run/postgresql port=$pg_port user=postgres"
pg_wal_dir = "/var/lib/postgresql/15/main/pg_wal"
$rate_line
TOML
in_ct fleet-agentd check-config >/dev/null || fail "check-config refused the documented [wal]"
in_ct systemctl enable --now fleet-agent-wal >/dev/null 2>&1 \
    || { journal fleet-agent-wal; fail "fleet-agent-wal did not start"; }
in_ct systemctl restart fleet-agentd || { journal fleet-agentd; fail "fleet-agentd did not start"; }
in_ct tee -a /etc/postgresql/15/main/postgresql.conf >/dev/null <<'CONF'
wal_level = replica
archive_mode = on
archive_command = 'agentctl wal push %p'
archive_timeout = 60s
CONF
in_ct systemctl restart postgresql || { journal postgresql@15-main; fail "postgresql did not restart"; }

log "pgbench -i -s $scale"
in_ct runuser -u postgres -- pgbench -h /var/run/postgresql -p $pg_port -i -s "$scale" -q postgres >/dev/null 2>&1 \
    || fail "pgbench -i failed"
size=$(psql_at $pg_port "SELECT sum(pg_database_size(oid)) FROM pg_database")
log "databases: $((size / 1048576)) MiB; backup_max_rate = ${max_rate:-(none)}"

# --- A base backup into a pipe, watched through fleet-agentd's API meanwhile.
log "agentctl backup create | cat, polling GET /v1/wal"
began=$(date +%s%N)
in_ct agentctl backup create >"$work/plain.out" 2>"$work/plain.err" &
backup_pid=$!
: >"$work/api.samples"
: >"$work/status.samples"
turn=0
while kill -0 "$backup_pid" 2>/dev/null; do
    # TCP API and the WAL service's status in turn, each about once a second.
    if [ $((turn % 2)) -eq 0 ]; then
        api_get "$api" /v1/wal >>"$work/api.samples" 2>/dev/null || true
    else
        in_ct agentctl wal status >>"$work/status.samples" 2>/dev/null || true
    fi
    turn=$((turn + 1))
    sleep 0.5
done
wait "$backup_pid" || { journal fleet-agent-wal; cat "$work/plain.out" "$work/plain.err" >&2; fail "agentctl backup create failed"; }
seconds=$(elapsed "$began")
log "the backup took ${seconds} s; agentctl printed:"
cat "$work/plain.out" >&2
grep -q 'base backup .* taken' "$work/plain.out" || fail "backup create did not say the backup was taken"
cat "$work/plain.out" "$work/plain.err" >"$work/plain.all"
if grep -q $'[\r\x1b]' "$work/plain.all"; then
    fail "agentctl wrote terminal codes into a pipe: $(od -c "$work/plain.all" | head -20)"
fi
# Plain lines: `base backup: backup <id>: 61.0MiB of 158.6MiB (38%), 20.1MiB/s, reading from pg_basebackup`.
python3 - "$work/plain.out" <<'PY' || fail "the plain progress lines are not what docs/wal.md shows"
import re, sys
units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
size = r"([0-9.]+)(B|KiB|MiB|GiB)"
line_re = re.compile(rf"^base backup: backup [0-9TZ]+: {size}(?: of {size} \(([0-9]+)%\))?, {size}/s, \S")
done, totals, rates = [], [], []
for line in open(sys.argv[1]):
    m = line_re.match(line)
    if not m:
        continue
    done.append(float(m[1]) * units[m[2]])
    if m[3]:
        totals.append(float(m[3]) * units[m[4]])
    rates.append(float(m[6]) * units[m[7]])
print(f"{len(done)} plain progress lines, done {done[:1]}..{done[-1:]}, totals {sorted(set(totals))[:3]}", file=sys.stderr)
assert len(done) >= 5, f"only {len(done)} plain progress lines"
assert done == sorted(done), f"bytes went down: {done}"
assert done[-1] > done[0], f"bytes did not grow: {done}"
assert len(totals) >= 3, f"only {len(totals)} lines with a total"
assert max(rates) > 0, "no rate above 0"
PY

python3 - "$work/api.samples" "$max_rate" <<'PY' || fail "GET /v1/wal did not show the backup's progress as it ran"
import json, sys
samples = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cap = {"KiB": 1 << 10, "MiB": 1 << 20}[sys.argv[2][-3:]] * float(sys.argv[2][:-3]) if sys.argv[2] else None
progress = [s["progress"] for s in samples if s.get("progress")]
print(f"{len(samples)} GET /v1/wal samples, {len(progress)} with progress: "
      + ", ".join(f'{p["done_bytes"]}/{p.get("total_bytes")}' for p in progress)
      + "; steps: " + " / ".join(dict.fromkeys(p["detail"] for p in progress)), file=sys.stderr)
assert len(progress) >= 3, f"progress in only {len(progress)} of {len(samples)} samples"
assert all(p["operation"] == "backup" for p in progress), progress
done = [p["done_bytes"] for p in progress]
assert any(b > a for a, b in zip(done, done[1:])), f"done_bytes never grew: {done}"
totals = [p["total_bytes"] for p in progress if p.get("total_bytes")]
assert totals and all(t >= d for t, d in ((p["total_bytes"], p["done_bytes"]) for p in progress if p.get("total_bytes"))), progress
assert any(p["bytes_per_second"] > 0 for p in progress), progress
# Only pg_basebackup's "checkpoint completed" (-v) moves the step on from
# "starting pg_basebackup": its messages are read as installed (PostgreSQL 15,
# the unit's locale).
assert any(p["detail"] == "reading from pg_basebackup" for p in progress), "the step never became reading"
# backup_max_rate reached pg_basebackup: the server's throttle sends at most
# an eighth of a second's worth ahead of the cap, and the rate shown counts
# from a little earlier than the server's start; after 3 s that burst is under
# 5%. (An upper bound only: a slow host can never break it.)
if cap:
    fastest = max(p["bytes_per_second"] for p in progress if p["elapsed_seconds"] >= 3)
    print(f"fastest rate shown {fastest / 1048576:.2f} MiB/s, cap {cap / 1048576:.2f} MiB/s", file=sys.stderr)
    assert fastest <= cap * 1.05, f"a rate of {fastest:.0f} B/s above backup_max_rate ({cap:.0f} B/s)"
PY
grep -qE '^progress: +backup [0-9TZ]+: [0-9.]+(B|KiB|MiB|GiB)' "$work/status.samples" \
    || { cat "$work/status.samples" >&2; fail "agentctl wal status showed no progress line while the backup ran"; }
after=$(api_get "$api" /v1/wal) || fail "GET /v1/wal failed"
python3 -c 'import json,sys; assert not json.loads(sys.argv[1]).get("progress")' "$after" \
    || fail "progress is left in GET /v1/wal after the backup: $after"
out=$(in_ct agentctl wal status) || fail "agentctl wal status failed"
grep -q '^progress:' <<<"$out" && fail "agentctl wal status shows progress after the backup: $out"

# --- The operator's terminal: a second backup on a pseudo-terminal draws a bar.
log "agentctl backup create on a pseudo-terminal (script)"
docker exec -e TERM=xterm-256color "$SD_CT" script -qfec "agentctl backup create" /dev/null >"$work/tty.out" 2>&1 </dev/null \
    || { cat -v "$work/tty.out" >&2; fail "agentctl backup create on a terminal failed"; }
grep -q 'base backup .* taken' "$work/tty.out" || { cat -v "$work/tty.out" >&2; fail "no 'taken' on the terminal"; }
python3 - "$work/tty.out" <<'PY' || { cat -v "$work/tty.out" >&2; fail "no progress bar was drawn on the terminal"; }
import re, sys
text = open(sys.argv[1], "rb").read().decode(errors="replace")
assert "\x1b[" in text, "no terminal codes at all"
# indicatif: `base backup: backup <id> [=====>    ] 12.00 MiB/85.00 MiB 4.0MiB/s, ...`
bars = re.findall(r"base backup: backup [0-9TZ]+ \[(=*)>? *\] ", text)
frames = re.findall(r"base backup: backup [0-9TZ]+ \[[^\]]*\] [^\x1b\r\n]*", text)
print("the last frame: " + (frames[-1] if frames else "none"), file=sys.stderr)
print(f"{len(bars)} bar frames, longest {max(map(len, bars), default=0)} of 30", file=sys.stderr)
assert len(bars) >= 2 and any(bars), f"{len(bars)} bar frames"
# A terminal gets the bar, not plain lines as well.
assert not re.search(r"base backup: backup [0-9TZ]+: [0-9.]+\w+ of ", text), "plain lines on a terminal"
PY

# --- Restore into a new cluster's directory, as docs/wal.md says (the port aside).
log "agentctl restore --to /var/lib/postgresql/15/restored | cat"
in_ct pg_createcluster 15 restored -p $restored_port >/dev/null || fail "pg_createcluster failed"
in_ct rm -r /var/lib/postgresql/15/restored
in_ct install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/15/restored
began=$(date +%s%N)
in_ct agentctl restore --to /var/lib/postgresql/15/restored >"$work/restore.out" 2>"$work/restore.err" \
    || { journal fleet-agent-wal; cat "$work/restore.out" "$work/restore.err" >&2; fail "agentctl restore failed"; }
seconds=$(elapsed "$began")
cat "$work/restore.out" >&2
grep -q '^restored base backup ' "$work/restore.out" || fail "restore did not say what it restored"
cat "$work/restore.out" "$work/restore.err" >"$work/restore.all"
grep -q $'[\r\x1b]' "$work/restore.all" && fail "agentctl restore wrote terminal codes into a pipe"
# A restore is not throttled: under ~1 s (the first look at the progress) it
# prints no line, so only the form of the lines it printed is checked.
lines=$(grep -c '^restore: ' "$work/restore.out" || true)
log "the restore took ${seconds} s and printed $lines progress line(s)"
bad=$(grep '^restore: ' "$work/restore.out" | grep -vE '^restore: restore [0-9TZ]+: [0-9.]+(B|KiB|MiB|GiB) of [0-9.]+(B|KiB|MiB|GiB) \([0-9]+%\), [0-9.]+(B|KiB|MiB|GiB)/s, (downloading|checking|unpacking|syncing)' || true)
[ -z "$bad" ] || fail "restore progress lines not as docs/wal.md shows: $bad"
in_ct test -f /var/lib/postgresql/15/restored/recovery.signal || fail "no recovery.signal in the restored directory"

# --- An image pull as installed: fleet-agentd (User=fleet-agent) pulls through
# the host's Docker engine from a loopback registry behind a slow link (as
# tests/tests/ops.rs does for the root daemon), so the pull lasts ~15 s.
log "a department whose image is pulled over a 48 KiB/s link"
[ -x /usr/bin/docker-registry ] || fail "/usr/bin/docker-registry is missing (scripts/test.sh installs it)"
docker image inspect fleet-test-agent:1 >/dev/null 2>&1 || "$PKGTEST_ROOT/tests/images/build.sh" >&2
mkdir -p "$work/registry"
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/registry/data" "$registry_port" >"$work/registry/config.yml"
/usr/bin/docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 &
registry_pid=$!
# A TCP relay handing out at most 48 KiB a second towards the client.
python3 - "$slow_port" "$registry_port" $((48 * 1024)) >"$work/relay.log" 2>&1 <<'PY' &
import socket, sys, threading, time
listen, upstream, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def pipe(src, dst, pause):
    try:
        while data := src.recv(4096):
            dst.sendall(data)
            time.sleep(pause * len(data) / 4096)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
server = socket.create_server(("127.0.0.1", listen))
while True:
    client, _ = server.accept()
    try:
        up = socket.create_connection(("127.0.0.1", upstream))
    except OSError:
        client.close()
        continue
    threading.Thread(target=pipe, args=(client, up, 0), daemon=True).start()
    threading.Thread(target=pipe, args=(up, client, 4096 / rate), daemon=True).start()
PY
relay_pid=$!
registry_up() { python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$registry_port/v2/', timeout=2)"; }
for _ in $(seq 1 60); do registry_up 2>/dev/null && break; sleep 0.5; done
registry_up || fail "docker-registry did not answer on $registry_port: $(cat "$work/registry/log")"
# A layer of its own (640 KiB of noise), so the pull moves bytes: the test
# image's layers are on this engine already.
head -c $((640 * 1024)) /dev/urandom >"$work/blob"
printf 'FROM fleet-test-agent:1\nCOPY blob /blob\n' >"$work/Dockerfile"
pushed="127.0.0.1:$registry_port/prog-$node:1"
image="127.0.0.1:$slow_port/prog-$node:1"
docker build -q -t "$pushed" "$work" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; fail "docker build of the pull image failed"; }
docker push "$pushed" >/dev/null || fail "docker push to the loopback registry failed"
docker rmi "$pushed" >/dev/null
pulled_image=$image
docker image inspect "$image" >/dev/null 2>&1 && fail "$image is on the engine before the pull"

dept=$node-pull
in_ct tee "/root/$dept.toml" >/dev/null <<TOML
id = "$dept"
image = "$image"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
in_ct agentctl apply --wait -f "/root/$dept.toml" >"$work/apply.out" 2>"$work/apply.err" &
apply_pid=$!
: >"$work/dept.samples"
while kill -0 "$apply_pid" 2>/dev/null; do
    api_get "$api" "/v1/departments/$dept" >>"$work/dept.samples" 2>/dev/null || true
    sleep 0.5
done
wait "$apply_pid" || { cat "$work/apply.out" "$work/apply.err" >&2; journal fleet-agentd 40; fail "agentctl apply --wait failed"; }
cat "$work/apply.out" >&2
cat "$work/apply.out" "$work/apply.err" >"$work/apply.all"
grep -q $'[\r\x1b]' "$work/apply.all" && fail "agentctl apply --wait wrote terminal codes into a pipe"
grep -qE "^$dept: pull $image: [0-9.]+(B|KiB|MiB)( of [0-9.]+(B|KiB|MiB) \([0-9]+%\))?, [0-9.]+(B|KiB|MiB)/s, " "$work/apply.out" \
    || fail "agentctl apply --wait printed no plain pull progress line"
python3 - "$work/dept.samples" "$image" <<'PY' || fail "GET /v1/departments/<id> did not show the pull's progress"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
progress = [r["progress"] for r in rows if r.get("progress")]
print(f"{len(rows)} GET /v1/departments samples, {len(progress)} with progress: "
      + ", ".join(f'{p["done_bytes"]}/{p.get("total_bytes")}' for p in progress), file=sys.stderr)
assert len(progress) >= 2, f"progress in only {len(progress)} samples"
assert all(p["operation"] == "pull" and p["subject"] == sys.argv[2] for p in progress), progress
done = [p["done_bytes"] for p in progress]
assert any(b > a for a, b in zip(done, done[1:])), f"done_bytes never grew: {done}"
assert any(p["bytes_per_second"] > 0 for p in progress), progress
PY
row=$(api_get "$api" "/v1/departments/$dept") || fail "GET /v1/departments/$dept failed"
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert r["state"] == "running" and not r.get("progress"), r' "$row" \
    || fail "after the pull the department is not running without progress: $row"
log "ok"

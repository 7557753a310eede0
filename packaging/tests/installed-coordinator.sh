#!/usr/bin/env bash
# Coordinator mode as installed, with the coordinator away and the store lost
# (issue 12): the .deb in a systemd container, agent.toml with a
# [coordinator] table and token_file as docs/install.md says, a stand-in
# coordinator on the host's loopback (python3 stdlib) serving two
# departments. Once both run, the stand-in is stopped, the daemon killed with
# SIGKILL and state.db destroyed (garbage, then deleted); after the start both
# containers must be adopted (same ids, same ports, no create or destroy
# event in Docker's record) and none removed as an orphan for more than two
# resync intervals while the coordinator stays away; STATUS says the store
# was rebuilt. Then the coordinator comes back with a document that drops one
# department: only then is its container removed.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
a=$PKGTEST_NAME-a
b=$PKGTEST_NAME-b
# Ports 44100-44109: the pool, the API, the stand-in coordinator.
api=127.0.0.1:44108
coord_port=44109
image=fleet-test-agent:1
token=coord-token-$PKGTEST_NAME
work=$(mktemp -d)
coord_pid=""
stop_coordinator() {
    [ -z "$coord_pid" ] || { kill "$coord_pid" 2>/dev/null || true; wait "$coord_pid" 2>/dev/null || true; }
    coord_pid=""
}
installed_node_up "$node"
trap 'rc=$?; stop_coordinator; rm -rf "$work"; _installed_node_exit $rc' EXIT

# The stand-in: answers POST /v1/nodes/<node>/sync with the document in
# $work/doc.json (ETag = its hash; 304 when If-None-Match matches), 401
# without the bearer token; logs each request line to $work/coord.log.
cat >"$work/coord.py" <<'PY'
import hashlib, http.server, sys
port, token, doc_path, log_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with open(log_path, "a") as log:
            log.write(self.path + "\n")
        if self.headers.get("Authorization") != "Bearer " + token:
            self.send_response(401); self.send_header("Content-Length", "0"); self.end_headers(); return
        body = open(doc_path, "rb").read()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304); self.send_header("ETag", etag); self.end_headers(); return
        self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
start_coordinator() {
    python3 "$work/coord.py" "$coord_port" "$token" "$work/doc.json" "$work/coord.log" &
    coord_pid=$!
}
dept_json() {
    printf '{"id": "%s", "image": "%s", "health": {"interval": "1s", "timeout": "500ms", "start_period": "0s"}}' "$1" "$image"
}
printf '{"revision": 1, "departments": [%s, %s]}\n' "$(dept_json "$a")" "$(dept_json "$b")" >"$work/doc.json"
start_coordinator

in_ct sh -c "umask 077; printf '%s\n' '$token' >/etc/fleet-agent/coordinator.token"
in_ct chown fleet-agent:fleet-agent /etc/fleet-agent/coordinator.token
in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
resync_interval = "2s"
[ports]
range = "44100-44104"
bind = "127.0.0.1"
[api]
listen = "$api"
[coordinator]
url = "http://127.0.0.1:$coord_port"
token_file = "/etc/fleet-agent/coordinator.token"
poll_interval = "1s"
TOML

healthy() {
    out=$(in_ct agentctl status --json 2>/dev/null) || return 1
    python3 -c '
import json, sys
doc = json.loads(sys.argv[1])
rows = {d.get("id"): d for d in doc.get("departments", [])}
sys.exit(0 if all(rows.get(i, {}).get("state") == "running" and rows[i].get("health") == "healthy" for i in sys.argv[2:]) else 1)' "$out" "$@"
}
cid() { docker inspect -f '{{ .Id }}' "aio-$1" 2>/dev/null; }
port_of() {
    docker inspect -f '{{ range $p, $b := .NetworkSettings.Ports }}{{ range $b }}{{ .HostPort }}{{ end }}{{ end }}' "aio-$1"
}
# create/destroy events of this node's containers between two times.
lifecycle_events() {
    docker events --since "$1" --until "$(date +%s.%N)" --filter type=container \
        --filter "label=fleet-agent.node=$node" --filter event=create --filter event=destroy \
        --format '{{ .Action }} {{ .Actor.Attributes.name }}'
}

in_ct systemctl start fleet-agentd.service || fail "fleet-agentd did not start"
until_ok 60 "$a and $b running healthy from the coordinator's document" healthy "$a" "$b"
id_a=$(cid "$a"); id_b=$(cid "$b"); port_a=$(port_of "$a"); port_b=$(port_of "$b")
log "aio-$a ${id_a:0:12} on $port_a, aio-$b ${id_b:0:12} on $port_b"

log "the coordinator goes away"
stop_coordinator

for loss in garbage deleted; do
    since=$(date +%s.%N)
    log "kill -9, then $loss state.db, then start (coordinator away)"
    in_ct systemctl kill -s KILL fleet-agentd.service
    in_ct systemctl stop fleet-agentd.service || true
    in_ct test -f /var/lib/fleet-agent/state.db || fail "no state.db to destroy"
    case $loss in
        garbage)
            in_ct sh -c 'cd /var/lib/fleet-agent && for f in state.db state.db-wal; do
                [ -e "$f" ] && head -c 16384 /dev/urandom >"$f"; done; true'
            want=unreadable ;;
        deleted)
            in_ct rm -f /var/lib/fleet-agent/state.db /var/lib/fleet-agent/state.db-wal /var/lib/fleet-agent/state.db-shm
            want=missing ;;
    esac
    in_ct systemctl start fleet-agentd.service || { journal 40; fail "fleet-agentd did not start after $loss state.db"; }
    until_ok 30 "$a and $b healthy after $loss state.db" healthy "$a" "$b"
    # More than two resync intervals (2s) with the coordinator still away.
    sleep 6
    healthy "$a" "$b" || { journal 40; fail "$loss state.db: a department went while the coordinator is away"; }
    [ "$(cid "$a")" = "$id_a" ] || fail "$loss state.db: aio-$a was replaced"
    [ "$(cid "$b")" = "$id_b" ] || fail "$loss state.db: aio-$b was replaced"
    [ "$(port_of "$a")" = "$port_a" ] || fail "$loss state.db: the port of $a moved"
    [ "$(port_of "$b")" = "$port_b" ] || fail "$loss state.db: the port of $b moved"
    events=$(lifecycle_events "$since")
    [ -z "$events" ] || fail "$loss state.db: Docker recorded create/destroy: $events"
    status=$(in_ct systemctl show -p StatusText --value fleet-agentd)
    grep -q "state.db was $want" <<<"$status" || fail "STATUS does not say state.db was $want: $status"
    [ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "not active after $loss state.db"
done

log "the coordinator comes back without $b"
since=$(date +%s.%N)
printf '{"revision": 2, "departments": [%s]}\n' "$(dept_json "$a")" >"$work/doc.json"
start_coordinator
gone() { ! docker inspect "aio-$b" >/dev/null 2>&1; }
until_ok 30 "aio-$b removed once the coordinator dropped it" gone
[ "$(cid "$a")" = "$id_a" ] || fail "aio-$a was replaced when the coordinator came back"
events=$(lifecycle_events "$since")
[ "$events" = "destroy aio-$b" ] || fail "expected only the destroy of aio-$b, Docker recorded: $events"
log "ok: both adopted (same ids and ports, no create/destroy) after garbage and deleted state.db with the coordinator away; aio-$b removed only once the coordinator dropped it"

#!/usr/bin/env bash
# As installed: standalone desired state under the shipped unit (daemon as
# fleet-agent, ProtectSystem=strict, /etc read-only to it), in one systemd
# container, one step after another:
#   1. `agentctl apply -f` creates a department; its spec lands in
#      /var/lib/fleet-agent/applied.d (0600), not in /etc;
#   2. a hand-written departments.d file + `systemctl reload` creates another;
#      apply/delete of that id are refused naming the file;
#   3. `agentctl delete` removes the applied one, and it stays gone after a
#      reload;
#   4. a bad file in departments.d, then `systemctl restart`: the unit is active,
#      the earlier department still runs in the same container (adopted) and is
#      supervised (killed, it is restarted), STATUS, `agentctl doctor` and
#      fleet_agent_desired_state_valid say the file is bad, naming it, and the
#      deleted department stays gone;
#   5. the file fixed, a reload: all clear again.
source "$(dirname "$0")/lib.sh"

node=$PKGTEST_NAME
applied=$PKGTEST_NAME-a
hand=$PKGTEST_NAME-h
# Ports 47540-47549 (the pool 47540-47544, then the API).
api=127.0.0.1:47549
image=fleet-test-agent:1
installed_node_up "$node"

journal() { in_ct journalctl -u fleet-agentd --no-pager -n "${1:-30}" >&2 || true; }

# until SECONDS WHAT COMMAND...: polls COMMAND every 0.25 s.
until_ok() {
    local seconds=$1 what=$2; shift 2
    local tries=$((seconds * 4))
    for _ in $(seq 1 "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    journal 40
    fail "$what (after ${seconds}s)"
}

running() { [ "$(docker inspect -f '{{ .State.Running }}' "aio-$1" 2>/dev/null)" = true ]; }
gone() { ! docker inspect "aio-$1" >/dev/null 2>&1; }
cid() { docker inspect -f '{{ .Id }}' "aio-$1"; }
metric() {
    api_get "$api" /metrics \
        | awk -v n="$1" '$1 == n { print $2 }'
}
status_text() { in_ct systemctl show -p StatusText --value fleet-agentd; }
spec() {
    cat <<TOML
id = "$1"
image = "$image"
[health]
interval = "1s"
timeout = "500ms"
start_period = "0s"
TOML
}

in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47540-47544"
bind = "127.0.0.1"
[api]
listen = "$api"
TOML
in_ct systemctl start fleet-agentd.service || { journal 50; fail "fleet-agentd did not start"; }

log "1. agentctl apply -f creates $applied; the spec goes to the state directory"
spec "$applied" | in_ct tee /root/applied.toml >/dev/null
in_ct agentctl apply -f /root/applied.toml || { journal; fail "agentctl apply failed under the unit"; }
until_ok 60 "aio-$applied never ran" running "$applied"
[ "$(in_ct stat -c '%a %U' "/var/lib/fleet-agent/applied.d/$applied.toml")" = "600 fleet-agent" ] \
    || fail "the applied spec is not /var/lib/fleet-agent/applied.d/$applied.toml (0600 fleet-agent)"
[ -z "$(in_ct ls -A /etc/fleet-agent/departments.d)" ] || fail "agentctl apply wrote into /etc/fleet-agent/departments.d"

log "2. a hand-written spec and systemctl reload create $hand"
spec "$hand" | in_ct sh -c "cat >/etc/fleet-agent/departments.d/$hand.toml"
in_ct fleet-agentd check-config >/dev/null || fail "check-config rejects the hand-written spec"
in_ct systemctl reload fleet-agentd || fail "reload failed"
until_ok 60 "aio-$hand never ran after the reload" running "$hand"
running "$applied" || fail "the reload removed the applied department $applied"
rc=0; out=$(in_ct agentctl apply -f "/etc/fleet-agent/departments.d/$hand.toml" 2>&1) || rc=$?
[ $rc -ne 0 ] && grep -q "departments.d/$hand.toml" <<<"$out" && grep -q 'systemctl reload' <<<"$out" \
    || fail "apply of a hand-written id was not refused naming its file (rc $rc): $out"
rc=0; out=$(in_ct agentctl delete "$hand" 2>&1) || rc=$?
[ $rc -ne 0 ] && grep -q "departments.d/$hand.toml" <<<"$out" \
    || fail "delete of a hand-written id was not refused naming its file (rc $rc): $out"
running "$hand" || fail "a refused delete removed aio-$hand"

log "3. agentctl delete removes $applied, and a reload does not bring it back"
in_ct agentctl delete "$applied" || { journal; fail "agentctl delete failed under the unit"; }
gone "$applied" || fail "aio-$applied still exists after delete"
! in_ct test -e "/var/lib/fleet-agent/applied.d/$applied.toml" || fail "delete left the applied spec file"
in_ct systemctl reload fleet-agentd || fail "reload failed"
sleep 2
gone "$applied" || fail "aio-$applied came back after a reload"

log "4. a bad file, then systemctl restart: supervision goes on"
before=$(cid "$hand")
printf 'id = "Bad_Id"\nimage = "%s"\n' "$image" | in_ct sh -c 'cat >/etc/fleet-agent/departments.d/typo.toml'
rc=0; out=$(in_ct fleet-agentd check-config 2>&1) || rc=$?
[ $rc -eq 64 ] && grep -q 'typo.toml:1:1: id' <<<"$out" || fail "check-config did not name typo.toml:1:1: id (rc $rc): $out"
in_ct systemctl restart fleet-agentd || { journal 50; fail "the unit did not start with a bad spec file"; }
[ "$(in_ct systemctl is-active fleet-agentd)" = active ] || fail "the unit is not active"
[ "$(cid "$hand")" = "$before" ] || fail "aio-$hand was replaced by the restart instead of adopted"
running "$hand" || fail "aio-$hand is not running after the restart"
status=$(status_text)
grep -q 'REFUSED' <<<"$status" && grep -q 'typo.toml' <<<"$status" \
    || fail "the STATUS line does not say the desired state is refused naming typo.toml: $status"
log "status: $status"
rc=0; out=$(in_ct agentctl doctor 2>&1) || rc=$?
[ $rc -ne 0 ] && grep -q 'FAIL desired state.*typo.toml:1:1: id' <<<"$out" \
    || fail "agentctl doctor does not fail on the refused desired state naming typo.toml (rc $rc): $out"
[ "$(metric fleet_agent_desired_state_valid)" = 0 ] || fail "fleet_agent_desired_state_valid is not 0"
# Whole output first: `| grep -q` would stop reading at the first match,
# agentctl would die of SIGPIPE, and pipefail would call that a miss.
events=$(in_ct agentctl events --after 0 2>/dev/null) || fail "agentctl events failed"
grep -q 'desired_state_refused' <<<"$events" || fail "no desired_state_refused event"
gone "$applied" || fail "aio-$applied came back after the restart"
# Supervised: the daemon restarts the killed container itself (Docker's
# restart policy is `no`).
docker kill "aio-$hand" >/dev/null
until_ok 30 "the killed aio-$hand was not restarted while the desired state is refused" running "$hand"

log "5. the file fixed, a reload: accepted again"
in_ct rm /etc/fleet-agent/departments.d/typo.toml
in_ct systemctl reload fleet-agentd || fail "reload failed"
valid=""
for _ in $(seq 1 120); do
    [ "$(metric fleet_agent_desired_state_valid)" = 1 ] && { valid=1; break; }
    sleep 0.25
done
[ -n "$valid" ] || fail "fleet_agent_desired_state_valid did not return to 1 after the fix"
! grep -q 'REFUSED' <<<"$(status_text)" || fail "STATUS still says refused after the fix: $(status_text)"
rc=0; out=$(in_ct agentctl doctor 2>&1) || rc=$?
[ $rc -eq 0 ] || fail "agentctl doctor still fails after the fix (rc $rc): $out"
log "ok: apply, delete, hand-written reload, bad file + restart and adoption as installed"

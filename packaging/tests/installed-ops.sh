#!/usr/bin/env bash
# As installed: `agentctl doctor` on a WAL host, run the way an operator of the
# fleet-agent group runs it (as the fleet-agent user) and inside a sandbox
# made of the daemon's own unit (User=fleet-agent, ProtectSystem=strict, the
# system-call filter, ...), against fleet-agentd and fleet-agent-wal under
# their shipped units:
#   1. the archive (file:///var/backups/fleet-agent, as docs/wal.md sets it up)
#      answers: `ok archive`; the clock check says what it could find out;
#   2. the archive directory taken from postgres (chown root, the WAL service
#      cannot write): doctor fails, naming the target, the cause and the fix;
#      given back, it passes again;
#   3. a host whose timedatectl reports NTP off and unsynchronized (a stand-in
#      `timedatectl` in /usr/local/bin: this container has no D-Bus, and the
#      kernel's clock is the test host's): doctor fails naming
#      `timedatectl set-ntp true`.
source "$(dirname "$0")/lib.sh"
# No `cmd | grep -q` below: grep -q exits at the first match, cmd may then die
# of SIGPIPE, and pipefail turns a match into a failure.

node=$PKGTEST_NAME
# Ports 47710-47719: the department pool 47710-47714, the API 47719.
api=127.0.0.1:47719
installed_node_up "$node"

journal() { in_ct journalctl -u "$1" --no-pager -n "${2:-30}" >&2 || true; }
as_operator() { in_ct runuser -u fleet-agent -- agentctl doctor "$@"; }
# doctor inside the shipped unit's sandbox: a oneshot unit made of
# fleet-agentd.service's own User= and sandbox lines (not its state and runtime
# directories, which this unit's stop would remove).
# (systemd-run would be shorter but needs D-Bus, which this container lacks.)
sandboxed() {
    in_ct sh -c '{
        printf "[Service]\nType=oneshot\nExecStart=/usr/bin/agentctl doctor %s\nStandardOutput=truncate:/run/fleet-ops-doctor.out\n" "$*"
        sed -n "/^User=/,/^\[Install\]/p" /lib/systemd/system/fleet-agentd.service \
            | grep -vE "^(\[Install\]|#|StateDirectory|RuntimeDirectory|RemoveIPC)"
    } >/run/systemd/system/fleet-ops-doctor.service && systemctl daemon-reload' sh "$@"
    # doctor's failing exit fails the unit; its status is read below.
    in_ct systemctl start fleet-ops-doctor.service >/dev/null 2>&1 || true
    in_ct cat /run/fleet-ops-doctor.out
    return "$(in_ct systemctl show -p ExecMainStatus --value fleet-ops-doctor.service)"
}
# check JSON NAME FIELD: one field of one check of `doctor --json`.
check() {
    python3 -c 'import json,sys; c=[c for c in json.loads(sys.argv[1]) if c["name"]==sys.argv[2]]; print(c[0].get(sys.argv[3], "") if c else "missing")' "$1" "$2" "$3"
}

in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "47710-47714"
bind = "127.0.0.1"
[api]
listen = "$api"
[wal]
target = "file:///var/backups/fleet-agent"
socket = "/run/fleet-agent-wal/wal.sock"
TOML
in_ct fleet-agentd check-config >/dev/null || fail "check-config refused the [wal] of docs/wal.md"
in_ct systemctl enable --now fleet-agent-wal >/dev/null 2>&1 \
    || { journal fleet-agent-wal; fail "fleet-agent-wal did not start"; }
in_ct systemctl start fleet-agentd || { journal fleet-agentd; fail "fleet-agentd did not start"; }

log "1. doctor as the fleet-agent user and sandboxed: the archive answers"
for run in as_operator sandboxed; do
    out=""
    for _ in $(seq 1 40); do
        out=$($run --json 2>/dev/null) || true
        [ "$(check "$out" daemon ok)" = True ] && break
        sleep 0.5
    done
    [ "$(check "$out" daemon ok)" = True ] || fail "$run: doctor does not reach the daemon: $out"
    [ "$(check "$out" archive ok)" = True ] || fail "$run: the archive check fails on a working archive: $out"
    grep -q 'file:///var/backups/fleet-agent answers' <<<"$(check "$out" archive detail)" \
        || fail "$run: the archive check does not name the target: $out"
    clock_ok=$(check "$out" clock ok)
    clock=$(check "$out" clock detail)
    log "$run: clock ok=$clock_ok warn=$(check "$out" clock warn): $clock"
    case "$clock" in
        "synchronized "*) [ "$clock_ok" = True ] || fail "$run: a synchronized clock fails: $out" ;;
        *"timedatectl set-ntp true"* | *"chronyc sources"* | *"UDP port 123"*) ;;
        *) fail "$run: the clock check names no fix: $clock" ;;
    esac
done
text=$(as_operator 2>&1) || true
grep -qE '^ok +archive +file:///var/backups/fleet-agent answers' <<<"$text" || fail "doctor's text has no ok archive line: $text"
grep -qE '^(ok  |warn|FAIL) clock ' <<<"$text" || fail "doctor's text has no clock line: $text"

log "2. the archive taken from the WAL service's user: doctor fails, naming the fix"
in_ct chown root:root /var/backups/fleet-agent
in_ct chmod 0755 /var/backups/fleet-agent
failed=""
for _ in $(seq 1 30); do # the WAL service reuses a probe for 10 s
    out=$(as_operator --json 2>/dev/null) || true
    if [ "$(check "$out" archive ok)" = False ]; then failed=$out; break; fi
    sleep 1
done
[ -n "$failed" ] || fail "doctor still passes an archive postgres cannot write: $out"
detail=$(check "$failed" archive detail)
log "archive: $detail"
grep -q 'file:///var/backups/fleet-agent is not reachable' <<<"$detail" && grep -q 'Permission denied' <<<"$detail" \
    && grep -q 'writable by the WAL service' <<<"$detail" || fail "the archive failure does not say what and why: $detail"
rc=0; out=$(sandboxed 2>&1) || rc=$?
[ $rc -ne 0 ] && grep -qE '^FAIL archive +file:///var/backups/fleet-agent is not reachable' <<<"$out" \
    || fail "sandboxed doctor does not fail the broken archive (rc $rc): $out"
in_ct chown postgres:postgres /var/backups/fleet-agent
ok=""
for _ in $(seq 1 30); do
    out=$(as_operator --json 2>/dev/null) || true
    if [ "$(check "$out" archive ok)" = True ]; then ok=1; break; fi
    sleep 1
done
[ -n "$ok" ] || fail "doctor does not pass once the archive is given back: $out"

log "3. a host whose NTP is off: doctor fails naming timedatectl set-ntp true"
in_ct sh -c 'printf "#!/bin/sh\necho NTP=no\necho NTPSynchronized=no\n" >/usr/local/bin/timedatectl && chmod 755 /usr/local/bin/timedatectl'
rc=0; text=$(as_operator 2>&1) || rc=$?
in_ct rm -f /usr/local/bin/timedatectl
[ $rc -ne 0 ] && grep -qE '^FAIL clock .*timedatectl set-ntp true' <<<"$text" \
    || fail "doctor does not fail an unsynchronized clock naming the fix (rc $rc): $text"
log "ok"

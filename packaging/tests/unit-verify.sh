#!/usr/bin/env bash
# Test 3: the units as installed by the package pass `systemd-analyze verify`
# (binaries, man pages and all resolved inside a clean Debian root) and
# `systemd-analyze security --offline=yes` at exposure <= 2.0.
source "$(dirname "$0")/lib.sh"
scores=()

ensure_base
deb=$(ensure_deb)
trap overlay_down EXIT
overlay_up
root_install "$deb" >"$OVL_DIR/install.log" 2>&1 || { cat "$OVL_DIR/install.log" >&2; fail "install failed"; }

# Every unit the package ships: fleet-agentd and the WAL service (fleet-agent-wal).
for name in fleet-agentd fleet-agent-wal; do
    unit=/usr/lib/systemd/system/$name.service
    in_root test -f "$unit" || fail "$unit is not installed"
    # verify prints problems on stderr and may still exit 0 for some of them, so
    # any output at all is a failure.
    out=$(in_root systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify $name failed:
$out"
    [ -z "$out" ] || fail "systemd-analyze verify $name complained:
$out"

    out=$(in_root systemd-analyze security --offline=yes --threshold=20 "$unit" 2>&1) \
        || fail "exposure of $name above 2.0:
$out"
    score=$(grep -o "Overall exposure level for $name.service: [0-9.]*" <<<"$out" | awk '{print $NF}')
    [ -n "$score" ] || fail "no exposure score for $name in:
$out"
    log "$name: verify clean, exposure $score"
    # The highest of the units is what the Rust test checks.
    scores+=("$score")
done
worst=$(printf '%s\n' "${scores[@]}" | sort -g | tail -1)
log "ok: verify clean, highest exposure $worst"
echo "exposure=$worst"

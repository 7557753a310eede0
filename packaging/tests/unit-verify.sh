#!/usr/bin/env bash
# Test 3: the unit as installed by the package passes `systemd-analyze verify`
# (binaries, man pages and all resolved inside a clean Debian root) and
# `systemd-analyze security --offline=yes` at exposure <= 2.0.
source "$(dirname "$0")/lib.sh"

ensure_base
deb=$(ensure_deb)
trap overlay_down EXIT
overlay_up
root_install "$deb" >"$OVL_DIR/install.log" 2>&1 || { cat "$OVL_DIR/install.log" >&2; fail "install failed"; }

unit=/usr/lib/systemd/system/fleet-agentd.service
# verify prints problems on stderr and may still exit 0 for some of them, so
# any output at all is a failure.
out=$(in_root systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify failed:
$out"
[ -z "$out" ] || fail "systemd-analyze verify complained:
$out"

out=$(in_root systemd-analyze security --offline=yes --threshold=20 "$unit" 2>&1) \
    || fail "exposure above 2.0:
$out"
score=$(grep -o 'Overall exposure level for fleet-agentd.service: [0-9.]*' <<<"$out" | awk '{print $NF}')
[ -n "$score" ] || fail "no exposure score in:
$out"
log "ok: verify clean, exposure $score"
echo "exposure=$score"

#!/usr/bin/env bash
# Test 2: the .deb installs, upgrades and purges in a clean Debian root (an
# overlay of a cached debootstrap root, driven by apt in a chroot): user and
# directories get the right modes, `fleet-agentd check-config` passes on the
# installed default, a locally edited agent.toml survives the upgrade, the
# state a previous build left in state.db is migrated and kept, the docs are
# in /usr/share/doc/fleet-agent, purge keeps the user while it owns WAL archive
# files, and otherwise purge leaves nothing behind.
source "$(dirname "$0")/lib.sh"

ensure_base
deb_old=$(ensure_deb "$PKGTEST_DEB_VERSION_OLD")
deb_new=$(ensure_deb "$PKGTEST_DEB_VERSION_NEW")
trap overlay_down EXIT
overlay_up

log "install $PKGTEST_DEB_VERSION_OLD"
root_install "$deb_old" >"$OVL_DIR/install.log" 2>&1 || { cat "$OVL_DIR/install.log" >&2; fail "install failed"; }
[ "$(in_root dpkg-query -W -f '${Status} ${Version}' fleet-agent)" = "install ok installed $PKGTEST_DEB_VERSION_OLD" ] \
    || fail "fleet-agent is not installed"

# The system user: no login, no home of its own, member of docker.
IFS=: read -r _ _ uid gid _ home shell < <(in_root getent passwd fleet-agent) || fail "no fleet-agent user"
[ "$uid" -lt 1000 ] || fail "fleet-agent uid $uid is not a system uid"
[ "$home" = /var/lib/fleet-agent ] || fail "home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "shell is $shell"
[ "$(in_root getent group fleet-agent | cut -d: -f3)" = "$gid" ] || fail "primary group is not fleet-agent"
in_root id -nG fleet-agent | tr ' ' '\n' | grep -qx docker || fail "fleet-agent is not in group docker"

assert_mode /etc/fleet-agent 750 root:fleet-agent
assert_mode /etc/fleet-agent/departments.d 750 root:fleet-agent
assert_mode /etc/fleet-agent/agent.toml 640 root:fleet-agent
assert_mode /var/lib/fleet-agent 750 fleet-agent:fleet-agent
assert_mode /usr/bin/fleet-agentd 755 root:root
assert_mode /usr/bin/agentctl 755 root:root
assert_mode /usr/lib/fleet-agent/fleet-agent-wal 755 root:root
[ -z "$(ls -A "$OVL/etc/fleet-agent/departments.d")" ] || fail "departments.d is not empty"
[ -L "$OVL/etc/systemd/system/multi-user.target.wants/fleet-agentd.service" ] \
    || fail "fleet-agentd.service is not enabled"
in_root man -w agentctl >/dev/null || fail "man agentctl finds no page"

# What ExecStartPre= runs, as the user the unit runs it as.
in_root runuser -u fleet-agent -- fleet-agentd check-config \
    || fail "check-config rejects the installed default agent.toml"
printf 'max_departments = 0\nbogus_key = 1\n' >"$OVL/tmp/bad.toml"
rc=0; in_root fleet-agentd check-config --config /tmp/bad.toml 2>"$OVL_DIR/bad.err" || rc=$?
[ $rc -eq 64 ] || fail "check-config on a bad file exited $rc, expected 64"

[ -f "$OVL/usr/share/doc/fleet-agent/README.Debian" ] || fail "README.Debian is not installed"
[ -f "$OVL/usr/share/doc/fleet-agent/examples/agent.toml" ] || fail "examples/agent.toml is not installed"
zcat "$OVL/usr/share/doc/fleet-agent/install.md.gz" | grep -q 'Upgrading' || fail "install.md is not installed"

# The state a previous build left: a state.db of schema version 0, made by the
# code before schema versions (daemon/testdata/state-v0.db), where the daemon
# keeps it. The chroot runs no daemon; `fleet-agentd state` opens the store as
# the daemon does at start.
install -m 0600 "$PKGTEST_ROOT/daemon/testdata/state-v0.db" "$OVL/var/lib/fleet-agent/state.db"
in_root chown fleet-agent:fleet-agent /var/lib/fleet-agent/state.db

log "edit agent.toml locally, upgrade to $PKGTEST_DEB_VERSION_NEW"
sed -i 's/^#max_departments = 10$/max_departments = 7/' "$OVL/etc/fleet-agent/agent.toml"
grep -qx 'max_departments = 7' "$OVL/etc/fleet-agent/agent.toml" || fail "could not edit agent.toml"
edited=$(sha256sum <"$OVL/etc/fleet-agent/agent.toml")
uid_before=$uid
root_install "$deb_new" >"$OVL_DIR/upgrade.log" 2>&1 || { cat "$OVL_DIR/upgrade.log" >&2; fail "upgrade failed"; }
[ "$(in_root dpkg-query -W -f '${Version}' fleet-agent)" = "$PKGTEST_DEB_VERSION_NEW" ] || fail "upgrade did not happen"
[ "$(sha256sum <"$OVL/etc/fleet-agent/agent.toml")" = "$edited" ] || fail "the upgrade changed the edited agent.toml"
! ls "$OVL"/etc/fleet-agent/agent.toml.dpkg-* >/dev/null 2>&1 || fail "upgrade left agent.toml.dpkg-* files"
assert_mode /etc/fleet-agent/agent.toml 640 root:fleet-agent
[ "$(in_root id -u fleet-agent)" = "$uid_before" ] || fail "the upgrade changed the user's uid"
in_root runuser -u fleet-agent -- fleet-agentd check-config || fail "check-config fails after the upgrade"
state=$(in_root runuser -u fleet-agent -- fleet-agentd state) || fail "fleet-agentd state fails after the upgrade"
known=$(sed -n 's/^schema: version \([0-9]*\) (this binary knows up to \([0-9]*\))$/\1 \2/p' <<<"$state")
read -r got want <<<"$known"
[ -n "${got:-}" ] && [ "$got" = "$want" ] && [ "$got" -ge 1 ] || fail "state.db was not migrated to the new schema:
$state"
for line in 'department: hr fleet-test-agent:2 running' 'department: it fleet-test-agent:1 stopped' \
    'lease: 8001 hr' 'lease: 8002 it' 'origin: Existing'; do
    grep -qxF "$line" <<<"$state" || fail "after the upgrade state.db lost '$line':
$state"
done
[ -f "$OVL/var/lib/fleet-agent/state.db.schema-v0" ] || fail "no copy of state.db from before the migration"
assert_mode /var/lib/fleet-agent/state.db 600 fleet-agent:fleet-agent

log "purge while fleet-agent owns files in the WAL archive: the user stays"
mkdir -p "$OVL/var/backups/fleet-agent/0000000100000000000000AB"
in_root chown -R fleet-agent:fleet-agent /var/backups/fleet-agent
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q fleet-agent </dev/null >"$OVL_DIR/purge1.log" 2>&1 \
    || { cat "$OVL_DIR/purge1.log" >&2; fail "purge failed"; }
[ "$(in_root id -u fleet-agent 2>/dev/null)" = "$uid_before" ] || fail "purge removed the user that owns archive files"
in_root getent group fleet-agent >/dev/null || fail "purge removed the group of the user that owns archive files"
grep -q 'keeping the fleet-agent user' "$OVL_DIR/purge1.log" || fail "purge did not say why it kept the user:
$(cat "$OVL_DIR/purge1.log")"
[ "$(in_root stat -c %U /var/backups/fleet-agent/0000000100000000000000AB)" = fleet-agent ] \
    || fail "the archive lost its owner"
[ ! -e "$OVL/var/lib/fleet-agent" ] && [ ! -e "$OVL/etc/fleet-agent" ] || fail "purge left the state or config"
log "reinstall: the kept user (and so the archive's owner) comes back"
root_install "$deb_new" >"$OVL_DIR/reinstall.log" 2>&1 || { cat "$OVL_DIR/reinstall.log" >&2; fail "reinstall failed"; }
[ "$(in_root id -u fleet-agent)" = "$uid_before" ] || fail "the reinstall changed the user's uid"
rm -rf "$OVL/var/backups/fleet-agent"

log "purge with no archive files of the user"
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q fleet-agent </dev/null >"$OVL_DIR/purge.log" 2>&1 \
    || { cat "$OVL_DIR/purge.log" >&2; fail "purge failed"; }
! in_root getent passwd fleet-agent >/dev/null || fail "purge left the fleet-agent user"
! in_root getent group fleet-agent >/dev/null || fail "purge left the fleet-agent group"

# Everything the overlay's upper layer holds is a change against the clean
# root; apart from package-manager bookkeeping there must be none.
changes=$(
    cd "$OVL_DIR/upper"
    find . -mindepth 1 | sort | while read -r p; do
        lower="$PKGTEST_BASE/${p#./}"
        if [ -c "$p" ] && [ ! -L "$p" ] && [ "$(stat -c %t%T "$p")" = 00 ]; then
            echo "deleted ${p#.}"
        elif [ -d "$p" ] && [ ! -L "$p" ]; then
            [ -d "$lower" ] || echo "new dir ${p#.}"
        elif [ -e "$lower" ] || [ -L "$lower" ]; then
            if ! cmp -s "$p" "$lower" || [ "$(stat -c %a%u%g "$p")" != "$(stat -c %a%u%g "$lower")" ]; then
                echo "changed ${p#.}"
            fi
        else
            echo "new ${p#.}"
        fi
    done | grep -vE ' /(var/lib/dpkg|var/lib/apt|var/cache|var/log|tmp|var/lib/systemd/deb-systemd-helper-(enabled|masked))(/|$)| /etc/(passwd|group|shadow|gshadow)-$' || true
)
[ -z "$changes" ] || fail "purge left these behind:
$changes"
log "ok: install, upgrade with a kept local edit, purge without leftovers"

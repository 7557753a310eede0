# Shared helpers of the package tests (sourced, not run). They need root,
# debootstrap, lintian, cargo-deb and a running Docker engine.
#
# Cached under target/pkgtest/ so that only the first run pays:
#   base-<key>/            a debootstrap'ed Debian root with docker.io (masked),
#                          python3-apt, man-db and Debian's postgresql-15 with
#                          its default cluster 15/main (service not enabled):
#                          the "clean host"
#   fleet-pkgtest-base:<key>  the same root imported as a Docker image, booted
#                          with systemd as PID 1 for the runtime tests
#   debs/                  the .deb under test (two versions, for upgrades)
# Each test works on an overlay of the base, so the base itself stays clean.

set -euo pipefail
# Failures inside $(...) must stop the test too.
shopt -s inherit_errexit

PKGTEST_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PKGTEST_TARGET=${CARGO_TARGET_DIR:-$PKGTEST_ROOT/target}
PKGTEST_CACHE="$PKGTEST_TARGET/pkgtest"
# The Debian root and its image depend only on the recipe below, not on the
# code under test: FLEET_PKGTEST_SHARED lets several checkouts (worktrees) use
# one copy. The debs stay per checkout, in PKGTEST_CACHE.
PKGTEST_SHARED=${FLEET_PKGTEST_SHARED:-$PKGTEST_CACHE}
PKGTEST_SUITE=${FLEET_PKGTEST_SUITE:-bookworm}
PKGTEST_MIRROR=${FLEET_PKGTEST_MIRROR:-http://deb.debian.org/debian}
PKGTEST_BIN_DIR=${FLEET_BIN_DIR:-$PKGTEST_TARGET/debug}
# Bump when the recipe below changes; the key names the cached root and image.
PKGTEST_BASE_RECIPE="v2 $PKGTEST_SUITE minbase python3,python3-apt,systemd,adduser,procps,man-db,ca-certificates +docker.io +postgresql-15 (disabled)"
PKGTEST_BASE_KEY=$(printf '%s' "$PKGTEST_BASE_RECIPE" | sha256sum | cut -c1-12)
PKGTEST_BASE="$PKGTEST_SHARED/base-$PKGTEST_BASE_KEY"
PKGTEST_IMAGE="fleet-pkgtest-base:$PKGTEST_BASE_KEY"
# Names what a test creates on the shared Docker engine (container, node id,
# department ids): unique per test run (tests/tests/packaging.rs passes
# fleet_tests::unique_name), so runs side by side do not meet.
PKGTEST_NAME=${FLEET_PKGTEST_NAME:-pk$$}
PKGTEST_DEB_VERSION_OLD=0.3.0-1
PKGTEST_DEB_VERSION_NEW=0.3.0-2

mkdir -p "$PKGTEST_CACHE" "$PKGTEST_SHARED"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

# Run "$@" holding an exclusive lock, so parallel tests build a cache once.
with_lock() {
    local name=$1; shift
    local dir=$PKGTEST_CACHE
    case $name in base|image) dir=$PKGTEST_SHARED ;; esac
    (
        flock 9
        "$@"
    ) 9>"$dir/$name.lock"
}

_build_base() {
    [ -f "$PKGTEST_BASE/.complete" ] && return 0
    rm -rf "$PKGTEST_BASE" "$PKGTEST_BASE.tmp"
    local dir="$PKGTEST_BASE.tmp"
    log "debootstrap $PKGTEST_SUITE into $dir (first run only, ~2 min)"
    debootstrap --variant=minbase \
        --include=python3,python3-apt,systemd,adduser,procps,man-db,ca-certificates \
        "$PKGTEST_SUITE" "$dir" "$PKGTEST_MIRROR" >"$PKGTEST_SHARED/debootstrap.log" 2>&1 \
        || { tail -20 "$PKGTEST_SHARED/debootstrap.log" >&2; return 1; }
    # Keep maintainer scripts from starting daemons in the chroot while docker.io
    # and postgresql-15 install.
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
    chmod 755 "$dir/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    mount -t proc proc "$dir/proc"
    local rc=0
    chroot "$dir" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io' \
        >"$PKGTEST_SHARED/docker-io.log" 2>&1 || rc=$?
    # Debian's PostgreSQL as an operator gets it: postgresql-common creates the
    # default cluster 15/main (peer auth, pg_wal 0700, owned by postgres). Its
    # units are disabled so that the runtime tests which do not need it do not
    # start it on the host network (port 5432); installed-wal.sh starts it.
    [ $rc -ne 0 ] || chroot "$dir" env LANG=C.UTF-8 LC_ALL=C.UTF-8 sh -c \
        'DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15' \
        >"$PKGTEST_SHARED/postgresql.log" 2>&1 || rc=$?
    umount "$dir/proc"
    [ $rc -eq 0 ] || { tail -20 "$PKGTEST_SHARED/docker-io.log" "$PKGTEST_SHARED/postgresql.log" >&2; return 1; }
    # The tests use the host's engine through its socket; an engine of the
    # test host's own would fight over /run/docker.sock.
    chroot "$dir" systemctl mask docker.service docker.socket containerd.service >/dev/null 2>&1
    chroot "$dir" systemctl disable postgresql.service 'postgresql@15-main.service' >/dev/null 2>&1 || true
    chroot "$dir" apt-get clean
    rm -f "$dir/usr/sbin/policy-rc.d" "$dir/etc/resolv.conf"
    touch "$dir/.complete"
    mv "$dir" "$PKGTEST_BASE"
}

ensure_base() { with_lock base _build_base; }

_build_image() {
    docker image inspect "$PKGTEST_IMAGE" >/dev/null 2>&1 && return 0
    log "importing $PKGTEST_BASE as $PKGTEST_IMAGE"
    tar -C "$PKGTEST_BASE" --exclude=./.complete -c . | docker import - "$PKGTEST_IMAGE" >/dev/null
}

ensure_image() { ensure_base; with_lock image _build_image; }

# The inputs of the package; the cached debs are rebuilt when any changes.
_deb_inputs_hash() {
    (
        cd "$PKGTEST_ROOT"
        sha256sum "$PKGTEST_BIN_DIR/fleet-agentd" "$PKGTEST_BIN_DIR/fleet-agent-wal" "$PKGTEST_BIN_DIR/agentctl" daemon/Cargo.toml
        find packaging systemd wal/archive-module -type f ! -path 'packaging/generated/*' ! -path 'packaging/tests/*' -print0 \
            | sort -z | xargs -0 sha256sum
    ) | sha256sum | cut -c1-16
}

_build_debs() {
    local key; key=$(_deb_inputs_hash)
    local dir="$PKGTEST_CACHE/debs"
    [ -f "$dir/$key.stamp" ] && return 0
    rm -rf "$dir"; mkdir -p "$dir"
    for version in "$PKGTEST_DEB_VERSION_OLD" "$PKGTEST_DEB_VERSION_NEW"; do
        log "building fleet-agent $version from $PKGTEST_BIN_DIR"
        "$PKGTEST_ROOT/packaging/build-deb.sh" --bin-dir "$PKGTEST_BIN_DIR" \
            --deb-version "$version" --output "$dir" --fast >"$dir/build-$version.log" 2>&1 \
            || { cat "$dir/build-$version.log" >&2; return 1; }
    done
    touch "$dir/$key.stamp"
}

# Prints the path of the .deb of the given version (default: the first one).
ensure_deb() {
    for bin in fleet-agentd fleet-agent-wal agentctl; do
        [ -x "$PKGTEST_BIN_DIR/$bin" ] || fail "$PKGTEST_BIN_DIR/$bin is missing; run cargo build first"
    done
    with_lock debs _build_debs
    local version=${1:-$PKGTEST_DEB_VERSION_OLD}
    echo "$PKGTEST_CACHE/debs/fleet-agent_${version}_amd64.deb"
}

# An overlay of the base: writable, thrown away by overlay_down. Sets OVL
# (the merged root) and OVL_DIR (its parent, with upper/ holding every change).
overlay_up() {
    OVL_DIR=$(mktemp -d "$PKGTEST_CACHE/ovl.XXXXXX")
    mkdir -p "$OVL_DIR/upper" "$OVL_DIR/work" "$OVL_DIR/merged"
    mount -t overlay overlay \
        -o "lowerdir=$PKGTEST_BASE,upperdir=$OVL_DIR/upper,workdir=$OVL_DIR/work" "$OVL_DIR/merged"
    OVL="$OVL_DIR/merged"
    mount -t proc proc "$OVL/proc"
    mount --bind /dev "$OVL/dev"
    mount --bind /dev/pts "$OVL/dev/pts"
}

overlay_down() {
    [ -n "${OVL_DIR:-}" ] || return 0
    umount "$OVL/proc" 2>/dev/null || true
    umount "$OVL/dev/pts" 2>/dev/null || true
    umount "$OVL/dev" 2>/dev/null || true
    umount "$OVL" 2>/dev/null || umount -l "$OVL" 2>/dev/null || true
    rm -rf "$OVL_DIR"
    OVL_DIR=""
}

in_root() { chroot "$OVL" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# Installs or upgrades a .deb in the overlay as an operator would, without a terminal.
root_install() {
    local deb=$1
    cp "$deb" "$OVL/tmp/"
    in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        "/tmp/$(basename "$deb")" </dev/null
}

# A container of the base image with systemd as PID 1, the host's Docker
# socket and the host's network (so the daemon's probes reach the department
# ports it publishes on the host's loopback). A scenario may set the array
# PKGTEST_CT_ARGS to more `docker run` arguments (a bind mount). Sets SD_CT.
systemd_container_up() {
    local name=$1
    SD_CT=$name
    docker rm -f "$SD_CT" >/dev/null 2>&1 || true
    # --privileged is not used: the test host may lack capabilities it adds.
    docker run -d --name "$SD_CT" --hostname "$SD_CT" --network host \
        --cap-add ALL --cap-drop SYS_RESOURCE \
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
        --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
        -v /var/run/docker.sock:/var/run/docker.sock \
        ${PKGTEST_CT_ARGS[@]+"${PKGTEST_CT_ARGS[@]}"} \
        -e container=docker "$PKGTEST_IMAGE" /lib/systemd/systemd >/dev/null
    local state=""
    for _ in $(seq 1 60); do
        state=$(docker exec "$SD_CT" systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
        sleep 0.5
    done
    case "$state" in running|degraded) ;; *) fail "systemd in $SD_CT did not come up (state: $state)" ;; esac
    # The image's docker group must carry the host socket's gid for the
    # fleet-agent user's membership to mean anything.
    local gid; gid=$(stat -c %g /var/run/docker.sock)
    docker exec "$SD_CT" groupmod -o -g "$gid" docker
}

systemd_container_down() {
    [ -n "${SD_CT:-}" ] || return 0
    docker rm -f "$SD_CT" >/dev/null 2>&1 || true
    SD_CT=""
}

in_ct() { docker exec -i "$SD_CT" "$@"; }

# Installs the .deb into the systemd container as an operator (or the role)
# would, without a terminal, but keeps its first start from happening (the
# test's own config goes in first; ports must not collide between tests).
# Streamed in: /tmp is a tmpfs in the container, and `docker cp` writes under
# such mounts (into the image layer), where nothing inside can see the file.
ct_install_deb() {
    local deb=$1 ct_deb
    ct_deb="/tmp/$(basename "$deb")"
    in_ct sh -c 'cat >"$1"' sh "$ct_deb" <"$deb" || fail "cannot copy the package into $SD_CT"
    in_ct sh -c 'printf "#!/bin/sh\nexit 101\n" >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" </dev/null >/tmp/install.log 2>&1; rc=$?
        rm -f /usr/sbin/policy-rc.d; [ $rc -eq 0 ] || cat /tmp/install.log; exit $rc' sh "$ct_deb" || fail "install failed"
}

# The start of an as-installed scenario: the cached root and the .deb, the
# test agent image, and this test's systemd container with the .deb installed
# (not started: the scenario's own agent.toml goes in first). On exit the
# container and every container of node $1 are removed; when the scenario
# failed, what the daemon saw is printed first. Sets SD_CT and PKGTEST_DEB.
installed_node_up() {
    PKGTEST_NODE=$1
    ensure_image
    PKGTEST_DEB=$(ensure_deb)
    docker image inspect fleet-test-agent:1 >/dev/null 2>&1 || "$PKGTEST_ROOT/tests/images/build.sh" >&2
    trap '_installed_node_exit $?' EXIT
    _installed_node_cleanup
    systemd_container_up "fleet-$PKGTEST_NAME"
    ct_install_deb "$PKGTEST_DEB"
}

_installed_node_cleanup() {
    systemd_container_down
    remove_node_containers "$PKGTEST_NODE"
}

_installed_node_exit() {
    if [ "$1" -ne 0 ] && [ -n "${SD_CT:-}" ]; then
        in_ct agentctl status >&2 || true
        in_ct systemctl status --no-pager fleet-agentd >&2 || true
        in_ct journalctl -u fleet-agentd --no-pager -n 60 >&2 || true
    fi
    _installed_node_cleanup
}

# api_get ADDR PATH: GET on the node's TCP API as an operator who may read
# its token: `api.token_file` of /etc/fleet-agent/agent.toml, else the one the
# daemon generated (<state_dir>/api.token, 0640 fleet-agent:fleet-agent).
api_get() {
    in_ct python3 - "$1" "$2" <<'PY'
import sys, tomllib, urllib.request
addr, path = sys.argv[1], sys.argv[2]
try:
    with open("/etc/fleet-agent/agent.toml", "rb") as f:
        cfg = tomllib.load(f)
except FileNotFoundError:
    cfg = {}
token_file = cfg.get("api", {}).get("token_file") or cfg.get("state_dir", "/var/lib/fleet-agent") + "/api.token"
with open(token_file) as f:
    token = [l.strip() for l in f if l.strip() and not l.startswith("#")][0]
request = urllib.request.Request("http://" + addr + path, headers={"Authorization": "Bearer " + token})
print(urllib.request.urlopen(request, timeout=5).read().decode())
PY
}

# journal [N]: the daemon's last N (40) journal lines on stderr.
journal() { in_ct journalctl -u fleet-agentd --no-pager -n "${1:-40}" >&2 || true; }

# until_ok SECONDS WHAT COMMAND...: polls COMMAND every 0.25 s; after SECONDS,
# prints the daemon's journal and fails naming WHAT.
until_ok() {
    local seconds=$1 what=$2; shift 2
    for _ in $(seq 1 $((seconds * 4))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    journal 60
    fail "$what (after ${seconds}s)"
}

# Removes every container the test daemon with this node id created.
remove_node_containers() {
    local node=$1 ids
    ids=$(docker ps -aq --filter "label=fleet-agent.node=$node")
    [ -z "$ids" ] || docker rm -f $ids >/dev/null
}

# assert_mode PATH MODE OWNER:GROUP (inside the overlay root)
assert_mode() {
    # stat inside the root: user and group names are the root's, not the host's.
    local got; got=$(in_root stat -c '%a %U:%G' "$1" 2>/dev/null) || fail "$1 does not exist"
    [ "$got" = "$2 $3" ] || fail "$1 is '$got', expected '$2 $3'"
}

# --- The WAL scenarios' host, set up as docs/wal.md "Set-up" says, in the
# systemd container; each scenario writes its own [wal] between wal_host_up
# and wal_service_up.

_wal_unit_journal() { in_ct journalctl -u "$1" --no-pager -n 40 >&2 || true; }

# wal_journal [N]: the WAL service's last N (40) journal lines on stderr.
wal_journal() { in_ct journalctl -u fleet-agent-wal --no-pager -n "${1:-40}" >&2 || true; }

# psql_at PORT SQL: one value per line, as the postgres user (peer auth).
psql_at() {
    in_ct runuser -u postgres -- psql -h /var/run/postgresql -p "$1" -d postgres -XAtqc "$2"
}

# wal_agent_toml TARGET PG_WAL_DIR [MORE]: /etc/fleet-agent/agent.toml as
# docs/wal.md "Set-up" writes it (the ports aside), for the scenario's $node,
# $api, $pg_port and department pool $port_base+1..+4; MORE (lines) follows
# pg_wal_dir in [wal] and may open further sections.
wal_agent_toml() {
    in_ct tee /etc/fleet-agent/agent.toml >/dev/null <<TOML
node_id = "$node"
[ports]
range = "$((port_base + 1))-$((port_base + 4))"
[api]
listen = "$api"
[wal]
target = "$1"
socket = "/run/fleet-agent-wal/wal.sock"
postgres = "host=/var/run/postgresql port=$pg_port user=postgres"
pg_wal_dir = "$2"
${3:-}
TOML
}

# in_journal PATTERN JOURNALCTL-ARGS...: PATTERN (grep) is in the journal
# lines those arguments select. journald reads each service's stream on its
# own schedule, so a line can land after what the service did next: poll it
# (wal_wait_for) rather than read the journal once.
in_journal() {
    local pattern=$1; shift
    grep -q -- "$pattern" <<<"$(in_ct journalctl --no-pager -o cat "$@")"
}

# archived_count / archived N: pg_stat_archiver's archived_count of the
# cluster on $pg_port; whether it is at least N.
archived_count() { psql_at "$pg_port" 'SELECT archived_count FROM pg_stat_archiver'; }
archived() { [ "$(archived_count)" -ge "$1" ]; }

# wal_wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.5 s; after
# SECONDS, prints the WAL service's journal and fails naming WHAT.
wal_wait_for() {
    local seconds=$1 what=$2; shift 2
    for _ in $(seq 1 $((seconds * 2))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    wal_journal 30
    fail "$what (waited ${seconds}s)"
}

# wal_host_up PG_PORT [DEB]: Debian's cluster 15/main as the package made it
# (pg_wal 0700 postgres, the peer rule for postgres), moved to PG_PORT (the
# container shares the host's network) and started; then DEB installed, not
# started (the scenario's agent.toml goes in first). Without DEB: the role
# installs it.
wal_host_up() {
    local port=$1 deb=${2:-}
    [ "$(in_ct stat -c '%a %U' /var/lib/postgresql/15/main/pg_wal)" = "700 postgres" ] \
        || fail "the base root's cluster is not Debian's default (pg_wal 0700 postgres)"
    in_ct grep -qE '^local +all +postgres +peer' /etc/postgresql/15/main/pg_hba.conf \
        || fail "pg_hba.conf does not have Debian's peer rule for postgres"
    in_ct sed -i "s/^port = 5432/port = $port/" /etc/postgresql/15/main/postgresql.conf
    in_ct systemctl start postgresql || { _wal_unit_journal postgresql@15-main; fail "postgresql did not start"; }
    [ -z "$deb" ] || ct_install_deb "$deb"
}

# wal_service_up: step 2 on the [wal] just written (check-config, the WAL
# service enabled and started, fleet-agentd restarted), then what the shipped
# unit promises: the WAL service runs as postgres (not in the fleet-agent
# group), without capabilities, under ProtectSystem=strict.
wal_service_up() {
    in_ct fleet-agentd check-config >/dev/null || fail "check-config refused the documented [wal]"
    in_ct systemctl enable --now fleet-agent-wal >/dev/null 2>&1 \
        || { _wal_unit_journal fleet-agent-wal; fail "fleet-agent-wal did not start"; }
    in_ct systemctl restart fleet-agentd || { _wal_unit_journal fleet-agentd; fail "fleet-agentd did not start"; }
    local pid status
    pid=$(in_ct systemctl show -p MainPID --value fleet-agent-wal)
    status=$(in_ct cat "/proc/$pid/status")
    grep -qE "^Uid:\s+$(in_ct id -u postgres)\s" <<<"$status" || fail "fleet-agent-wal does not run as postgres"
    # The WAL-only binary the docs name (docs/wal.md, "How it runs").
    local exe; exe=$(in_ct readlink "/proc/$pid/exe")
    [ "$exe" = /usr/lib/fleet-agent/fleet-agent-wal ] \
        || fail "fleet-agent-wal runs $exe, not /usr/lib/fleet-agent/fleet-agent-wal"
    grep -qE '^CapEff:\s+0+$' <<<"$status" || fail "fleet-agent-wal has capabilities"
    grep -qE "^Groups:.*\b$(in_ct getent group fleet-agent | cut -d: -f3)\b" <<<"$status" \
        && fail "postgres is in the fleet-agent group"
    grep -q '^ro' <<<"$(in_ct awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo")" \
        || fail "ProtectSystem=strict is not in effect for fleet-agent-wal"
}

# wal_archiving_on ARCHIVE_TIMEOUT: step 3, PostgreSQL's archive_command
# through agentctl, and PostgreSQL restarted.
wal_archiving_on() {
    in_ct tee -a /etc/postgresql/15/main/postgresql.conf >/dev/null <<CONF
wal_level = replica
archive_mode = on
archive_command = 'agentctl wal push %p'
archive_timeout = $1
CONF
    in_ct systemctl restart postgresql || { _wal_unit_journal postgresql@15-main; fail "postgresql did not restart"; }
}

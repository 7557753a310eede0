#!/usr/bin/env bash
# The test command of fleet-agent (README.md and .ci/run call it).
#
# On a fresh Debian 12 machine, as root, with no stdin, it:
#   1. installs the tools it needs if missing (C toolchain and static libc for the
#      test agent, cargo-nextest),
#   2. brings up every service in SERVICES (Docker, ...), installing them if missing,
#   3. moves Linux's ephemeral ports above the tests' fixed ones (49152-60999),
#      then builds the workspace once (`cargo build --workspace --bins --tests`),
#   4. builds the test images (tests/images/build.sh),
#   5. runs cargo nextest in two phases: every test not named `serial_*` in
#      parallel, then the `serial_*` tests one at a time (they may restart dockerd
#      or otherwise disturb the host).
# Both phases always run; the exit code is non-zero if anything failed.
#
# Extra arguments go to both nextest runs, e.g. `bash scripts/test.sh --test supervisor`
# or `bash scripts/test.sh -p fleet-model`.
# Environment: FLEET_TEST_THREADS (parallel phase, default 4),
#              FLEET_SKIP_SETUP=1 (skip steps 1-2 on a machine you know is ready).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
export DEBIAN_FRONTEND=noninteractive
exec </dev/null

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

# --- helpers -----------------------------------------------------------------

APT_UPDATED=0
# apt_install PKG...: installs the packages, running `apt-get update` at most once.
apt_install() {
  command -v apt-get >/dev/null || fail "need to install $* but apt-get is not available; install them by hand"
  if [[ $APT_UPDATED == 0 ]]; then
    info "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  info "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local seconds="$1" what="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
  info "$what is up"
}

# --- tools -------------------------------------------------------------------

setup_tools() {
  step "tools"
  if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null || fail "cargo is not installed; install Rust (rustup.rs), then run this again"
  info "$(cargo --version)"

  local missing=()
  command -v cc >/dev/null || missing+=(gcc)
  # The test agent is linked statically against glibc.
  [[ -f /usr/lib/x86_64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
  command -v git >/dev/null || missing+=(git)
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"

  if ! cargo nextest --version >/dev/null 2>&1; then
    info "installing cargo-nextest"
    cargo install --locked --quiet cargo-nextest
  fi
  info "$(cargo nextest --version | head -n1)"
}

# --- services ----------------------------------------------------------------
# Each service is a function `service_<name>` that makes sure <name> is installed
# and running, is idempotent, and says what it did. To add one (postgresql-15,
# s3s-fs, promtool, ...), write the function below and add its name to SERVICES.
SERVICES=(docker registry schemathesis packaging promtool prometheus postgresql moto haproxy)

service_docker() {
  if docker info >/dev/null 2>&1; then
    info "docker is running ($(docker version --format '{{.Server.Version}}'))"
    return
  fi
  command -v dockerd >/dev/null || apt_install docker.io
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    info "starting docker with systemctl"
    systemctl start docker || true
  fi
  if ! docker info >/dev/null 2>&1; then
    info "starting dockerd in the background (log: /var/log/fleet-test-dockerd.log)"
    setsid nohup dockerd >/var/log/fleet-test-dockerd.log 2>&1 </dev/null &
  fi
  wait_for 90 "docker" docker info ||
    fail "dockerd did not come up within 90s; see /var/log/fleet-test-dockerd.log"
}

# The pull tests start their own registry on loopback; they only need the binary.
service_registry() {
  if ! command -v docker-registry >/dev/null; then
    apt_install docker-registry
    # Debian's package starts a registry on :5000 under systemd; the tests want none.
    if [[ -d /run/systemd/system ]]; then systemctl disable --now docker-registry >/dev/null 2>&1 || true; fi
  fi
  info "docker-registry: $(command -v docker-registry)"
}

# schemathesis (PyPI) fuzzes the TCP API against docs/openapi.yaml
# (tests/tests/coordinator.rs). It goes into its own venv, one per version, so it
# never touches the system Python and a version bump never pulls the files from
# under a run using the old one; it is linked into /usr/local/bin where the test
# finds it. A lock serializes concurrent runs of this script on one machine.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=/opt/fleet-test/schemathesis-$SCHEMATHESIS_VERSION
service_schemathesis() {
  local bin="$SCHEMATHESIS_VENV/bin/schemathesis" version
  mkdir -p "$(dirname "$SCHEMATHESIS_VENV")"
  exec 9>"$SCHEMATHESIS_VENV.lock"
  flock 9
  version="$("$bin" --version 2>/dev/null || true)"
  if [[ $version == *"version $SCHEMATHESIS_VERSION" ]]; then
    info "schemathesis $SCHEMATHESIS_VERSION is installed ($bin)"
  else
    command -v python3 >/dev/null || apt_install python3
    # Debian ships venv (and ensurepip) separately.
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null ||
      apt_install python3-venv
    info "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
    rm -rf "$SCHEMATHESIS_VENV"
    python3 -m venv "$SCHEMATHESIS_VENV"
    "$SCHEMATHESIS_VENV/bin/pip" install --quiet --disable-pip-version-check \
      "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  ln -sfn "$bin" /usr/local/bin/schemathesis
  exec 9>&-
}

# The package tests (tests/tests/packaging.rs, packaging/tests/*.sh): debootstrap
# for the clean Debian root, lintian, cargo-deb, postgresql-server-dev-15 (the
# package's archive module), and Ansible with ansible-lint.
# Ansible comes from PyPI into a venv of Debian's python3 under /opt (the full
# `ansible` package, because the role test reaches its target host through the
# community.docker connection, which ansible-core lacks), linked into
# /usr/local/bin. Versions are pinned to ones tested with the role: Debian 12's
# python3 is 3.11, and ansible-core 2.20 and later need 3.12.
PKG_ANSIBLE_VENV=/opt/fleet-ansible
PKG_ANSIBLE_PINS=(ansible==12.3.0 ansible-lint==26.10.1)
PKG_CARGO_DEB_VERSION=3.8.0

service_packaging() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v lintian >/dev/null || missing+=(lintian)
  command -v dpkg-deb >/dev/null || missing+=(dpkg)
  command -v flock >/dev/null || missing+=(util-linux)
  # installed-wal-checksum checks FWAL3 headers with xxhsum -H2.
  command -v xxhsum >/dev/null || missing+=(xxhash)
  # build-deb.sh builds the PostgreSQL 15 archive module (fleet_archive.so)
  # with PGXS; the package does not depend on postgresql-15.
  [[ -f /usr/include/postgresql/15/server/postgres.h ]] || missing+=(postgresql-server-dev-15)
  command -v make >/dev/null || missing+=(make)
  command -v gcc >/dev/null || missing+=(gcc)
  [[ -x /usr/bin/python3 ]] || missing+=(python3)
  /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  info "$(lintian --version), debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"

  if [[ "$(cargo deb --version 2>/dev/null)" != *"$PKG_CARGO_DEB_VERSION"* ]]; then
    info "installing cargo-deb $PKG_CARGO_DEB_VERSION (~2.5 min)"
    cargo install --locked --quiet cargo-deb --version "$PKG_CARGO_DEB_VERSION"
  fi
  info "$(cargo deb --version)"

  local stamp="$PKG_ANSIBLE_VENV/.fleet-pins"
  if [[ "$(cat "$stamp" 2>/dev/null)" != "${PKG_ANSIBLE_PINS[*]}" ]]; then
    info "installing ${PKG_ANSIBLE_PINS[*]} into $PKG_ANSIBLE_VENV"
    rm -rf "$PKG_ANSIBLE_VENV"
    /usr/bin/python3 -m venv "$PKG_ANSIBLE_VENV"
    "$PKG_ANSIBLE_VENV/bin/pip" install --quiet --no-input "${PKG_ANSIBLE_PINS[@]}"
    printf '%s\n' "${PKG_ANSIBLE_PINS[*]}" >"$stamp"
  fi
  # Wrappers rather than symlinks: with the venv first on PATH, ansible-lint
  # finds the ansible-playbook next to it and does not warn about PATH.
  local tool
  for tool in ansible ansible-playbook ansible-galaxy ansible-config ansible-doc ansible-lint; do
    rm -f "/usr/local/bin/$tool"
    printf '#!/bin/sh\nPATH="%s/bin:$PATH" exec "%s/bin/%s" "$@"\n' \
      "$PKG_ANSIBLE_VENV" "$PKG_ANSIBLE_VENV" "$tool" >"/usr/local/bin/$tool"
    chmod 755 "/usr/local/bin/$tool"
  done
  # Whole outputs first: `| head` would make ansible die of SIGPIPE.
  local ansible_version lint_version
  ansible_version=$(ansible --version)
  lint_version=$(NO_COLOR=1 ansible-lint --nocolor --version 2>/dev/null)
  info "${ansible_version%%$'\n'*}, ${lint_version%%$'\n'*}"

  # The clean Debian root the package tests install into and boot (debootstrap
  # plus docker.io: 2-7 minutes the first time, then cached under
  # target/pkgtest/) is made in the background while the workspace compiles;
  # the tests wait for it through its lock.
  local cache="${CARGO_TARGET_DIR:-$ROOT/target}/pkgtest"
  mkdir -p "$cache"
  info "preparing the package tests' Debian root in the background (log: $cache/prepare.log)"
  bash "$ROOT/packaging/tests/prepare.sh" >"$cache/prepare.log" 2>&1 &
}

# Debian's haproxy in front of the departments (tests/tests/drain.rs, bench/drain.sh).
# Each test runs its own haproxy process with a generated config; the system
# service is never started (policy-rc.d or no init keeps the package from it).
service_haproxy() {
  if command -v haproxy >/dev/null; then
    info "haproxy is installed ($(haproxy -v 2>&1 | head -n1))"
    return
  fi
  RUNLEVEL=1 apt_install haproxy
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
  fi
}

# prometheus_binary NAME: installs /usr/local/bin/NAME (promtool or prometheus)
# taken out of Debian's `prometheus` .deb, unless NAME is on PATH already.
# Only the binary is needed: installing the package would also start the
# system service (and its node exporter, and pull its dependencies) for nothing.
prometheus_binary() {
  local name="$1" tmp
  if command -v "$name" >/dev/null; then
    info "$name is installed ($("$name" --version 2>&1 | head -n1))"
    return
  fi
  command -v apt-get >/dev/null || fail "$name is missing and apt-get is not available; install Prometheus' $name by hand"
  if [[ $APT_UPDATED == 0 ]]; then
    info "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  tmp="$(mktemp -d)"
  chmod 0755 "$tmp" # apt-get download runs as _apt
  info "extracting $name from Debian's prometheus package"
  (cd "$tmp" && apt-get download -qq prometheus >/dev/null)
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" "./usr/bin/$name"
  install -m 0755 "$tmp/usr/bin/$name" "/usr/local/bin/$name"
  rm -rf "$tmp"
  info "$name is installed ($("$name" --version 2>&1 | head -n1))"
}

# promtool checks /metrics, the alert rules and their unit tests (tests/tests/metrics.rs).
service_promtool() { prometheus_binary promtool; }

# The Prometheus server for tests/tests/ops.rs, which starts its own on
# loopback (scraping daemons under test, with the shipped alert rules).
service_prometheus() { prometheus_binary prometheus; }

# PostgreSQL 15 binaries for the WAL tests (each test runs its own throwaway
# cluster with initdb as the postgres user; no system cluster is needed).
service_postgresql() {
  if [[ -x /usr/lib/postgresql/15/bin/initdb && -x /usr/lib/postgresql/15/bin/pgbench ]] &&
    command -v pg_basebackup >/dev/null && command -v runuser >/dev/null && command -v curl >/dev/null; then
    info "postgresql 15 is installed ($(/usr/lib/postgresql/15/bin/postgres --version))"
    return
  fi
  apt_install postgresql-15 postgresql-client-15 util-linux curl
  info "installed $(/usr/lib/postgresql/15/bin/postgres --version)"
}

# moto's S3 server (PyPI) in a venv under /opt/moto; the WAL tests start their
# own instances on loopback.
service_moto() {
  if [[ -x /opt/moto/bin/moto_server ]]; then
    info "moto is installed (/opt/moto)"
    return
  fi
  command -v python3 >/dev/null && python3 -m venv --help >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -m venv /opt/moto >/dev/null 2>&1 || { apt_install python3-venv; python3 -m venv /opt/moto; }
  info "pip install moto[server] into /opt/moto"
  /opt/moto/bin/pip install -q --disable-pip-version-check 'moto[server]'
}

setup_services() {
  local service
  for service in "${SERVICES[@]}"; do
    step "service: $service"
    "service_$service"
  done
}

# --- ports -------------------------------------------------------------------
# The tests listen on fixed loopback ports in 42000-48999. Linux's default
# ephemeral range (32768-60999) now and then hands one of them to an outgoing
# connection first (seen: "host_port 47500 is held by another process on this
# host"); IANA's dynamic range (49152-65535) keeps the two apart.
ephemeral_ports() {
  local want="49152 60999" now file=/proc/sys/net/ipv4/ip_local_port_range
  now=$(tr -s '\t ' ' ' <"$file")
  [[ $now == "$want" ]] && return
  if echo "$want" >"$file" 2>/dev/null; then
    info "ephemeral ports: $want (were $now)"
  else
    info "cannot set $file to $want (not root?); a test may meet its port taken"
  fi
}

# --- build -------------------------------------------------------------------

build() {
  step "build: cargo build --workspace --bins --tests"
  cargo build --workspace --bins --tests
  # The harness runs the daemon and agentctl from here.
  export FLEET_BIN_DIR="${FLEET_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}"
  info "binaries from $FLEET_BIN_DIR"

  step "build: test images"
  bash tests/images/build.sh
}

# --- tests -------------------------------------------------------------------

# nextest names a test by its path inside its binary, e.g. `serial_x` or `mod::serial_x`.
SERIAL='test(/(^|::)serial_/)'
FAILED=()

run_phase() {
  local name="$1"; shift
  step "tests: $name"
  if cargo nextest run --workspace --no-fail-fast --no-tests=warn "$@"; then
    info "$name: passed"
  else
    FAILED+=("$name")
  fi
}

main() {
  local started=$SECONDS
  if [[ "${FLEET_SKIP_SETUP:-0}" != 1 ]]; then
    setup_tools
    setup_services
  fi
  step "ports"
  ephemeral_ports
  build
  run_phase "parallel (everything but serial_*)" \
    --test-threads "${FLEET_TEST_THREADS:-4}" -E "not $SERIAL" "$@"
  run_phase "serial (serial_*, one at a time)" \
    --test-threads 1 -E "$SERIAL" "$@"

  step "summary ($((SECONDS - started))s)"
  if ((${#FAILED[@]} > 0)); then
    printf '    FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
  fi
  info "all tests passed"
}

main "$@"

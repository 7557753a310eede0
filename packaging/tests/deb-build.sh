#!/usr/bin/env bash
# Test 1: the .deb builds, lintian passes (no errors or warnings beyond the
# overrides in packaging/debian/fleet-agent.lintian-overrides), and it holds
# what the package promises.
source "$(dirname "$0")/lib.sh"

deb=$(ensure_deb)
log "package: $deb"

log "lintian"
lintian --fail-on error,warning "$deb" \
    || fail "lintian reported errors or warnings (see above)"

listing=$(dpkg-deb -c "$deb" | awk '{print $1, $2, $6}')
expect_file() { # MODE PATH
    grep -qxF -- "$1 0/0 ./$2" <<<"$listing" || fail "dpkg -c does not list $2 with mode $1:
$listing"
}
expect_file -rwxr-xr-x usr/bin/fleet-agentd
expect_file -rwxr-xr-x usr/bin/agentctl
expect_file -rwxr-xr-x usr/lib/fleet-agent/fleet-agent-wal
expect_file -rw-r--r-- usr/lib/systemd/system/fleet-agentd.service
expect_file -rw-r--r-- usr/lib/systemd/system/fleet-agent-wal.service
expect_file -rw-r--r-- etc/fleet-agent/agent.toml
expect_file -rw-r--r-- usr/share/man/man1/agentctl.1.gz
expect_file -rw-r--r-- usr/share/man/man8/fleet-agentd.8.gz
expect_file -rw-r--r-- usr/share/man/man5/agent.toml.5.gz
expect_file -rw-r--r-- usr/share/man/man5/fleet-department.5.gz
expect_file -rw-r--r-- usr/share/bash-completion/completions/agentctl
expect_file -rw-r--r-- usr/share/zsh/vendor-completions/_agentctl
expect_file -rw-r--r-- usr/share/fish/vendor_completions.d/agentctl.fish
expect_file -rw-r--r-- usr/share/doc/fleet-agent/copyright
expect_file -rw-r--r-- usr/share/doc/fleet-agent/changelog.Debian.gz
expect_file -rw-r--r-- usr/share/doc/fleet-agent/README.Debian
expect_file -rw-r--r-- usr/share/doc/fleet-agent/install.md.gz
expect_file -rw-r--r-- usr/share/doc/fleet-agent/wal.md.gz
expect_file -rw-r--r-- usr/share/doc/fleet-agent/runbook.md.gz
expect_file -rw-r--r-- usr/share/doc/fleet-agent/agent.toml.md.gz
expect_file -rw-r--r-- usr/share/doc/fleet-agent/examples/agent.toml
expect_file -rw-r--r-- usr/share/doc/fleet-agent/examples/departments/demo.toml
expect_file -rw-r--r-- usr/lib/fleet-agent/postgresql/15/fleet_archive.so
# One man page per visible agentctl subcommand besides the main one.
[ "$(grep -c './usr/share/man/man1/agentctl-.*\.1\.gz$' <<<"$listing")" -ge 5 ] \
    || fail "expected a man page per agentctl subcommand:
$listing"
# Monitoring files are packaged whenever they exist in packaging/.
for f in "$PKGTEST_ROOT"/packaging/{prometheus,grafana,monitoring}/*; do
    [ -f "$f" ] || continue
    grep -q "/usr/share/fleet-agent/.*/$(basename "$f")\$" <<<"$listing" \
        || fail "$f exists but is not in the package"
done

ctl=$(mktemp -d); trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl"
[ "$(cat "$ctl/conffiles")" = "/etc/fleet-agent/agent.toml" ] \
    || fail "conffiles is '$(cat "$ctl/conffiles")', expected /etc/fleet-agent/agent.toml"
for script in postinst prerm postrm; do
    [ -x "$ctl/$script" ] || fail "$script missing"
    ! grep -q '#DEBHELPER#' "$ctl/$script" || fail "#DEBHELPER# left unexpanded in $script"
    grep -q 'Automatically added by cargo-deb' "$ctl/$script" || fail "$script has no systemd snippet"
done
grep -q 'adduser .*fleet-agent docker' "$ctl/postinst" || fail "postinst does not add fleet-agent to docker"
depends=$(dpkg-deb -f "$deb" Depends)
grep -qF 'docker.io | docker-ce' <<<"$depends" || fail "Depends is '$depends'"
# The archive module is for hosts that run PostgreSQL 15; the others need none.
! grep -q 'postgresql' <<<"$depends" || fail "Depends is '$depends': it must not name PostgreSQL"
recommends=$(dpkg-deb -f "$deb" Recommends)
grep -qw 'postgresql-client' <<<"$recommends" || fail "Recommends is '$recommends', expected postgresql-client (pg_basebackup)"

# The packaged binaries are the real ones: their man pages name every command.
data=$(mktemp -d); trap 'rm -rf "$ctl" "$data"' EXIT
dpkg-deb -x "$deb" "$data"
"$data/usr/bin/agentctl" --help >/dev/null || fail "packaged agentctl does not run"
nm -D --defined-only "$data/usr/lib/fleet-agent/postgresql/15/fleet_archive.so" | grep -qw _PG_archive_module_init \
    || fail "fleet_archive.so is not a PostgreSQL archive module (no _PG_archive_module_init)"
"$data/usr/bin/fleet-agentd" --help >/dev/null || fail "packaged fleet-agentd does not run"
zcat "$data/usr/share/man/man8/fleet-agentd.8.gz" | grep -q 'check\\-config' \
    || fail "fleet-agentd(8) does not document check-config"
# agent.toml(5) is generated from the config types: it knows the [wal.s3] keys.
zcat "$data/usr/share/man/man5/agent.toml.5.gz" | grep -q 'wal.s3.credentials_file' \
    || fail "agent.toml(5) does not document wal.s3.credentials_file"
# The hand-written sections of the two main pages (fleet_model::manpage).
for page in man8/fleet-agentd.8.gz man1/agentctl.1.gz; do
    text=$(zcat "$data/usr/share/man/$page")
    for section in 'EXIT STATUS' ENVIRONMENT FILES EXAMPLES; do
        grep -qE "^\.SH \"?$section\"?\$" <<<"$text" || fail "$page has no $section section"
    done
done
ctl_page=$(zcat "$data/usr/share/man/man1/agentctl.1.gz")
grep -q 'FLEET_AGENT_WAL_SOCKET' <<<"$ctl_page" || fail "agentctl(1) ENVIRONMENT misses FLEET_AGENT_WAL_SOCKET"
grep -q 'a different file is already archived' <<<"$ctl_page" || fail "agentctl(1) EXIT STATUS misses the wal push codes"
"$data/usr/bin/agentctl" --help | grep -q '^Examples:' || fail "agentctl --help shows no examples"
"$data/usr/bin/fleet-agentd" --help | grep -q '^Examples:' || fail "fleet-agentd --help shows no examples"
# The guides: README.Debian points at them, install.md says how to upgrade.
grep -q 'install.md' "$data/usr/share/doc/fleet-agent/README.Debian" || fail "README.Debian does not point at the guides"
zcat "$data/usr/share/doc/fleet-agent/install.md.gz" | grep -q '^## 6. Upgrading' \
    || fail "install.md has no Upgrading section"
grep -q 'status' "$data/usr/share/bash-completion/completions/agentctl" \
    || fail "bash completion does not know agentctl status"
log "ok: $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version), $(stat -c %s "$deb") bytes"

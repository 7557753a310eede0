#!/usr/bin/env bash
# Test 5: the push playbook's own `departments` list (deploy-app-server.yml,
# seed 000 section 2.4), rendered by the role's `preview` entry point, gives
# specs that `fleet-agentd check-config` accepts, with the playbook's container
# names (aio-<department_id>), image and host ports (8000 + loop.index).
source "$(dirname "$0")/lib.sh"

bin="$PKGTEST_BIN_DIR/fleet-agentd"
[ -x "$bin" ] || fail "$bin is missing; run cargo build first"
work=$(mktemp -d); trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

# Variables as an inventory of the push playbook has them: ten departments
# per app server, the image, the database host and LiveKit URL.
cat >"$work/push-vars.yml" <<'YAML'
docker_image: "registry.synrg.io/aio-agent:latest"
db_host: "10.0.2.10"
livekit_url: "wss://livekit.example.invalid"
departments:
  - { department_id: hr, db_password: "pw-hr" }
  - { department_id: finance, db_password: "pw-finance" }
  - { department_id: legal, db_password: "pw \"quoted\" \\ and ünïcode" }
  - { department_id: sales, db_password: "pw-sales" }
  - { department_id: marketing, db_password: "pw-marketing" }
  - { department_id: support, db_password: "pw-support", department_name: "Customer Support" }
  - { department_id: it, db_password: "pw-it" }
  - { department_id: operations, db_password: "pw-operations" }
  - { department_id: procurement, db_password: "pw-procurement" }
  - { department_id: research, db_password: "pw-research" }
YAML
cat >"$work/preview.yml" <<YAML
- name: Preview the migration of a push-playbook host
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [push-vars.yml]
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: Render the specs
      ansible.builtin.include_role:
        name: fleet_agent
        tasks_from: preview
      vars:
        fleet_agent_preview_dir: "$work/departments.d"
        fleet_agent_push_departments: "{{ departments }}"
        fleet_agent_push_image: "{{ docker_image }}"
        fleet_agent_push_env:
          DB_HOST: "{{ db_host }}"
          LIVEKIT_URL: "{{ livekit_url }}"
        # docs/migrating.md's figures: the seed's 1600 MiB as the hard limit.
        fleet_agent_push_resources: { cpus: 1.0, memory: 1600MiB, memory_reservation: 1200MiB }
YAML
ANSIBLE_ROLES_PATH="$PKGTEST_ROOT/ansible/roles" ANSIBLE_NOCOLOR=1 \
    ansible-playbook -i localhost, "$work/preview.yml" >"$work/ansible.log" 2>&1 \
    || { cat "$work/ansible.log" >&2; fail "the preview playbook failed"; }
! grep -q 'pw-hr' "$work/ansible.log" || fail "a db_password appeared in ansible's output"

# The installed default config, pointed at the rendered directory (and a
# scratch state directory, whose applied.d is the other half of the desired
# state), with docs/migrating.md's oversubscription.
sed -e 's|^#departments_dir = .*|departments_dir = "'"$work/departments.d"'"|' \
    -e 's|^#state_dir = .*|state_dir = "'"$work/state"'"|' \
    -e 's|^#memory_oversubscription = .*|memory_oversubscription = 1.25|' \
    "$PKGTEST_ROOT/packaging/agent.toml" >"$work/agent.toml"
grep -q "^departments_dir = \"$work/departments.d\"" "$work/agent.toml" || fail "could not point agent.toml at the specs"
grep -q "^memory_oversubscription = 1.25" "$work/agent.toml" || fail "could not set memory_oversubscription"
"$bin" check-config --config "$work/agent.toml" >"$work/check.out" 2>&1 \
    || { cat "$work/check.out" >&2; fail "check-config rejects the migrated specs"; }

# Same names, image, ports and environment as the push playbook.
python3 - "$work/departments.d" "$work/push-vars.yml" <<'PY' || fail "the migrated specs differ from what the push playbook deployed"
import sys, tomllib, os, json, re
d = sys.argv[1]
# push-vars.yml is simple enough to read without a YAML library.
text = open(sys.argv[2]).read()
items = re.findall(r'department_id: ([a-z-]+), db_password: ("(?:[^"\\]|\\.)*")', text)
files = sorted(os.listdir(d))
assert files == sorted(f"{i}.toml" for i, _ in items), files
for index, (dept, pw) in enumerate(items, start=1):
    spec = tomllib.load(open(os.path.join(d, f"{dept}.toml"), "rb"))
    want_pw = json.loads(pw)
    assert spec["id"] == dept, spec["id"]                      # container aio-<id>
    assert spec["image"] == "registry.synrg.io/aio-agent:latest", spec["image"]
    assert spec["host_port"] == 8000 + index, (dept, spec["host_port"])
    assert spec["container_port"] == 8080
    assert spec["env"] == {"DEPARTMENT_ID": dept, "DB_SCHEMA": f"{dept}_tenant", "DB_USER": f"{dept}_user",
                           "DB_HOST": "10.0.2.10", "LIVEKIT_URL": "wss://livekit.example.invalid"}, spec["env"]
    assert spec["secrets"] == {"DB_PASSWORD": want_pw}, dept
    assert spec["health"] == {"path": "/health", "interval": "30s", "timeout": "5s", "retries": 3}
    assert spec.get("name") == ("Customer Support" if dept == "support" else None), spec.get("name")
print("10 departments: ports", [8000 + i for i in range(1, 11)])
PY

# check-config really reads departments_dir: one broken spec must fail it,
# and be named in the report.
cp -r "$work/departments.d" "$work/broken.d"
sed -i 's/^host_port = 8003$/host_port = 0/' "$work/broken.d/legal.toml"
sed 's|^departments_dir = .*|departments_dir = "'"$work/broken.d"'"|' "$work/agent.toml" >"$work/broken.toml"
rc=0; "$bin" check-config --config "$work/broken.toml" >"$work/broken.out" 2>&1 || rc=$?
[ $rc -eq 64 ] || { cat "$work/broken.out" >&2; fail "check-config exited $rc on a broken spec, expected 64"; }
grep -q 'legal' "$work/broken.out" || { cat "$work/broken.out" >&2; fail "check-config did not name the broken spec"; }

# Memory admission as on the seed's 16 GB app server: check-config reads host
# memory as the daemon does, so reserved_memory is set to leave the budget such
# a host has (MemTotal ~15990 MiB minus 2 GiB = 13942 MiB) whatever this machine has.
mem_kib=$(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo)
budget_kib=$((13942 * 1024))
[ "$mem_kib" -gt "$budget_kib" ] || fail "this machine has less memory than the budget of a 16 GB host"
vps="$work/vps.toml"
sed "s|^#reserved_memory = .*|reserved_memory = $(((mem_kib - budget_kib) * 1024))|" "$work/agent.toml" >"$vps"
"$bin" check-config --config "$vps" >"$work/vps.out" 2>&1 \
    || { cat "$work/vps.out" >&2; fail "check-config refuses docs/migrating.md's figures on a 16 GB host"; }
grep -q 'memory reservations 11.7 GiB of 13.6 GiB budget, hard limits 15.6 GiB of 17.0 GiB' "$work/vps.out" \
    || { cat "$work/vps.out" >&2; fail "check-config does not report the memory sums"; }
# Without the oversubscription, the seed's limits are refused, naming the field and the fix.
sed 's|^memory_oversubscription = 1.25|memory_oversubscription = 1.0|' "$vps" >"$work/vps-1.toml"
rc=0; "$bin" check-config --config "$work/vps-1.toml" >"$work/vps-1.out" 2>&1 || rc=$?
[ $rc -eq 64 ] && grep -q 'resources.memory: memory limits would total 15.6 GiB.*memory_oversubscription' "$work/vps-1.out" \
    || { cat "$work/vps-1.out" >&2; fail "check-config accepted ten hard limits of 1600 MiB over a 13.6 GiB budget (rc $rc)"; }
# Without reservations, the limits themselves are what is promised: refused.
cp -r "$work/departments.d" "$work/noreserve.d"
sed -i '/^memory_reservation = /d' "$work/noreserve.d"/*.toml
sed 's|^departments_dir = .*|departments_dir = "'"$work/noreserve.d"'"|' "$vps" >"$work/vps-2.toml"
rc=0; "$bin" check-config --config "$work/vps-2.toml" >"$work/vps-2.out" 2>&1 || rc=$?
[ $rc -eq 64 ] && grep -q 'resources.memory_reservation: memory reservations would total 15.6 GiB' "$work/vps-2.out" \
    || { cat "$work/vps-2.out" >&2; fail "check-config accepted 15.6 GiB of reservations on a 13.6 GiB budget (rc $rc)"; }
log "ok: the push playbook's departments migrate with names, image and ports 8001-8010 kept; memory admission as on a 16 GB host"

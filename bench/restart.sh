#!/usr/bin/env bash
# Benchmark: how fast a crashed department runs again, against Docker's own
# `--restart on-failure` of the same image measured in the same run, and how long
# from the first failed probe to a healthy replacement, against the bound the
# spec implies.
#
#   bash bench/restart.sh            # writes its section of docs/benchmarks.md
#
# Environment: FLEET_BIN_DIR (default target/release, built if missing),
# BENCH_PORTS (default 48911-48920), BENCH_SAMPLES (default 5),
# BENCH_ROUNDS (default 3: Docker, then fleet-agentd, that many times in one run),
# BENCH_OUT (default docs/benchmarks.md).
# Not a test: it asserts nothing, it measures.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
PORTS="${BENCH_PORTS:-48911-48920}"
SAMPLES="${BENCH_SAMPLES:-5}"
ROUNDS="${BENCH_ROUNDS:-3}"
OUT="${BENCH_OUT:-docs/benchmarks.md}"
IMAGE=fleet-test-agent:1

bench_tools jq curl

bench_binaries

bench_workdir restart
BASE_LABEL="fleet-bench.baseline=$NODE"
trap bench_cleanup EXIT

# first_restart_ms LABEL_FILTER SINCE: waits until every container matching the
# filter died once and a container of the same department started after it, then
# prints one line per department: milliseconds from `die` to the next `start`.
# Docker's events carry nanosecond timestamps, so both sides are measured alike.
first_restart_ms() {
  local filter="$1" since="$2" key="$3" deadline=$((SECONDS + 60)) out
  while ((SECONDS < deadline)); do
    out="$(docker events --since "$since" --until "$(date +%s.%N)" --filter "label=$filter" \
      --filter type=container --format "{{json .}}" |
      jq -rs --arg key "$key" '
        map(select(.Action == "die" or .Action == "start"))
        | group_by(.Actor.Attributes[$key])
        | map(. as $evs
              | ([$evs[] | select(.Action == "die")][0]) as $die
              | select($die != null)
              | ([$evs[] | select(.Action == "start" and .timeNano > $die.timeNano)][0]) as $start
              | select($start != null)
              | (($start.timeNano - $die.timeNano) / 1e6 | floor))
        | .[]')"
    if [[ "$(wc -l <<<"$out")" -ge "$SAMPLES" && -n "$out" ]]; then
      printf '%s\n' "$out"
      return
    fi
    sleep 0.5
  done
  say "timed out waiting for $SAMPLES first restarts ($filter)"
  exit 1
}
# die_spread FILTER SINCE KEY: milliseconds between the first and the last
# department's first `die`: how much at once the restarts really were.
die_spread() {
  docker events --since "$2" --until "$(date +%s.%N)" --filter "label=$1" \
    --filter type=container --filter event=die --format "{{json .}}" |
    jq -rs --arg key "$3" 'group_by(.Actor.Attributes[$key]) | map(min_by(.timeNano).timeNano)
      | if length < 2 then 0 else ((max - min) / 1e6 | floor) end'
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

# --- Docker's on-failure restart and fleet-agentd, side by side, ROUNDS times ------
# The baseline containers are made like the daemon makes its own: a published port
# on 127.0.0.1 (the pool's first ports, free again between rounds) and every start-
# relevant setting of the HostConfig the daemon gave a container of its own in this
# run (baseline_flags: its network, docker-init, dropped capabilities, pids limit,
# no-new-privileges, log driver and options, ...). A container without a published
# port, without docker-init or on the default bridge starts faster, which would
# measure the container, not the restart.
PORT_LOW="${PORTS%-*}"
# baseline_flags ID: `docker run` flags reproducing the HostConfig of the daemon's
# container for department ID, one per line.
baseline_flags() {
  docker inspect "aio-$1" --format '{{json .HostConfig}}' | jq -r '
    (if .NetworkMode then "--network=\(.NetworkMode)" else empty end),
    (if .Init then "--init" else empty end),
    ((.CapDrop // [])[] | "--cap-drop=\(.)"),
    ((.CapAdd // [])[] | "--cap-add=\(.)"),
    (if (.PidsLimit // 0) > 0 then "--pids-limit=\(.PidsLimit)" else empty end),
    (if (.Memory // 0) > 0 then "--memory=\(.Memory)", "--memory-swap=\(.MemorySwap)" else empty end),
    (if (.NanoCpus // 0) > 0 then "--cpus=\(.NanoCpus / 1e9)" else empty end),
    (if .ReadonlyRootfs then "--read-only" else empty end),
    ((.Tmpfs // {}) | to_entries[] | "--tmpfs=\(.key):\(.value)"),
    ((.SecurityOpt // [])[] | "--security-opt=\(.)"),
    "--log-driver=\(.LogConfig.Type)",
    ((.LogConfig.Config // {}) | to_entries[] | "--log-opt=\(.key)=\(.value)")'
}
docker_round() { # ROUND -> die->start lines
  local round="$1" since i
  since="$(date +%s.%N)"
  # One after the other: five `docker run`s at once (with their exits a second
  # later) deadlocked Debian's dockerd 20.10.24 in libnetwork (sandbox delete
  # against allocateNetwork, 2026-12-03). "dies within" in the table shows how
  # close together the crashes came on each side.
  for i in $(seq 1 "$SAMPLES"); do
    docker run -d --name "bench-rs-$NODE-$round-$i" --label "$BASE_LABEL" --label "fleet-bench.dept=r$round-b$i" \
      -p "127.0.0.1:$((PORT_LOW + i - 1)):8080" "${BASELINE_FLAGS[@]}" \
      --restart on-failure -e CRASH_AFTER=1s "$IMAGE" >/dev/null
  done
  echo "$since" >"$WORK/since-docker-$round"
  first_restart_ms "$BASE_LABEL" "$since" fleet-bench.dept
  docker rm -f $(docker ps -aq --filter "label=$BASE_LABEL") >/dev/null
}

# The department task at debug level: its lines give restart_breakdown its times.
export RUST_LOG="info,fleet_agentd::supervisor::department=debug"
bench_start_daemon "$PORTS"

# The template for the baseline: one department of the daemon's, not crashing.
printf 'id = "tmpl"\nimage = "%s"\n[health]\nenabled = false\n' "$IMAGE" >"$WORK/specs/tmpl.toml"
ctl apply -f "$WORK/specs/tmpl.toml" >/dev/null
until [[ "$(docker inspect -f '{{.State.Running}}' aio-tmpl 2>/dev/null)" == true ]]; do sleep 0.05; done
mapfile -t BASELINE_FLAGS < <(baseline_flags tmpl)
ctl delete tmpl >/dev/null
say "baseline containers: docker run ${BASELINE_FLAGS[*]}"

crash_spec() { # ID BACKOFF
  cat <<EOF
id = "$1"
image = "$IMAGE"
[env]
CRASH_AFTER = "1s"
[health]
enabled = false
[restart]
backoff = "$2"
max_retries = 100
EOF
}
# agent_first_restart TAG BACKOFF -> die->start lines; its start time in $WORK/since-TAG.
# Like the baseline's `docker run -d` (which returns once the container runs), each
# department is applied on its own and the next one once its container runs, so the
# five crash about as close together on both sides ("dies within" in the table).
agent_first_restart() {
  local tag="$1" backoff="$2" i since
  rm -f "$WORK"/specs/*
  for i in $(seq 1 "$SAMPLES"); do crash_spec "$tag$i" "$backoff" >"$WORK/specs/$tag$i.toml"; done
  since="$(date +%s.%N)"
  echo "$since" >"$WORK/since-$tag"
  for i in $(seq 1 "$SAMPLES"); do
    ctl apply -f "$WORK/specs/$tag$i.toml" >/dev/null
    until [[ "$(docker inspect -f '{{.State.Running}}' "aio-$tag$i" 2>/dev/null)" == true ]]; do sleep 0.05; done
  done
  first_restart_ms "fleet-agent.node=$NODE" "$since" fleet-agent.department
  for i in $(seq 1 "$SAMPLES"); do ctl delete "$tag$i" >/dev/null; done
}

# restart_breakdown TAG: where the first restart of each TAG department went, as
# medians over the departments (ms): Docker's die -> the event at the department
# task; die -> the start call issued (the backoff, counted from the die's own
# time); the start call itself; the call issued -> Docker's start event.
restart_breakdown() {
  local tag="$1" since
  since="$(cat "$WORK/since-$tag")"
  docker events --since "$since" --until "$(date +%s.%N)" --filter "label=fleet-agent.node=$NODE" \
    --filter type=container --format "{{json .}}" | jq -s . >"$WORK/events-$tag.json"
  jq -Rrn --slurpfile ev "$WORK/events-$tag.json" --arg tag "$tag" '
    def ts: if . == null then null else
      (.timestamp | capture("^(?<s>[^.Z]+)(\\.(?<f>[0-9]+))?Z$")) as $t
      | (($t.s + "Z") | fromdateiso8601) + ("0." + ($t.f // "0") | tonumber) end;
    def ms($from; $to): if $from == null or $to == null then null else ($to - $from) * 1000 end;
    def med: map(select(. != null)) | sort
      | if length == 0 then "?" else (.[(length / 2 | floor)] | floor) end;
    [inputs | fromjson? | select((.timestamp | type) == "string" and ((.department // "") | startswith($tag)))] as $log
    | [$ev[0][] | select(.Action == "die" or .Action == "start")] as $evs
    | [$evs[] | .Actor.Attributes["fleet-agent.department"]] | unique
    | map(. as $d
        | ([$evs[] | select(.Actor.Attributes["fleet-agent.department"] == $d and .Action == "die")][0].timeNano / 1e9) as $die
        | ([$evs[] | select(.Actor.Attributes["fleet-agent.department"] == $d and .Action == "start" and .timeNano / 1e9 > $die)][0].timeNano / 1e9) as $start
        | ([$log[] | select(.department == $d and .message == "Docker die event received." and ts >= $die)][0] | ts) as $recv
        | ([$log[] | select(.department == $d and .message == "Starting container." and ts >= $die)][0] | ts) as $issue
        | ([$log[] | select(.department == $d and .message == "Container start call returned." and ts >= $die)][0] | .call_ms?) as $call
        | {lag: ms($die; $recv), issue: ms($die; $issue), call: $call, engine: ms($issue; $start)})
    | "die -> event at the task \(map(.lag) | med) ms; die -> start call \(map(.issue) | med) ms; start call \(map(.call) | med) ms; call -> start event \(map(.engine) | med) ms"
  ' "$WORK/daemon.log"
}

docker_medians="" fast_medians="" ratios="" rows=""
for round in $(seq 1 "$ROUNDS"); do
  say "round $round/$ROUNDS: Docker, $SAMPLES containers with --restart on-failure crashing after 1s"
  docker_ms="$(docker_round "$round")"
  d_med="$(median <<<"$docker_ms")"
  d_spread="$(die_spread "$BASE_LABEL" "$(cat "$WORK/since-docker-$round")" fleet-bench.dept)"
  say "round $round: Docker on-failure die -> start median ${d_med} ms ($(tr '\n' ' ' <<<"$docker_ms"))"
  say "round $round/$ROUNDS: fleet-agentd, $SAMPLES departments crashing after 1s, restart.backoff = 100ms"
  fast_ms="$(agent_first_restart "f${round}x" 100ms)"
  f_med="$(median <<<"$fast_ms")"
  breakdown="$(restart_breakdown "f${round}x")"
  f_spread="$(die_spread "fleet-agent.node=$NODE" "$(cat "$WORK/since-f${round}x")" fleet-agent.department)"
  ratio="$(awk -v a="$f_med" -v b="$d_med" 'BEGIN { printf "%.2f", a / b }')"
  say "round $round: fleet-agentd die -> start median ${f_med} ms ($(tr '\n' ' ' <<<"$fast_ms")); ratio $ratio; $breakdown"
  docker_medians+="$d_med"$'\n' fast_medians+="$f_med"$'\n' ratios+="$ratio"$'\n'
  rows+="| $round | ${d_med} ms ($(paste -sd' ' <<<"$docker_ms"); dies within ${d_spread} ms) | ${f_med} ms ($(paste -sd' ' <<<"$fast_ms"); dies within ${f_spread} ms) | ${ratio} | ${breakdown} |"$'\n'
done
docker_median="$(grep -v '^$' <<<"$docker_medians" | median)"
fast_median="$(grep -v '^$' <<<"$fast_medians" | median)"
ratio_median="$(grep -v '^$' <<<"$ratios" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"

say "fleet-agentd: the same with the default restart.backoff (1s)"
dflt_ms="$(agent_first_restart dflt 1s)"
dflt_median="$(median <<<"$dflt_ms")"
say "fleet-agentd backoff=1s: die -> start median ${dflt_median} ms ($(tr '\n' ' ' <<<"$dflt_ms"))"

# --- first failed probe -> healthy again ---------------------------------------------
say "fleet-agentd: a department whose /health fails 3s after start (interval 1s, timeout 500ms, retries 3)"
cat >"$WORK/specs/probe.toml" <<EOF
id = "probe"
image = "$IMAGE"
[env]
UNHEALTHY_AFTER = "3s"
[health]
path = "/health"
interval = "1s"
timeout = "500ms"
retries = 3
start_period = "0s"
[restart]
backoff = "100ms"
EOF
ctl apply -f "$WORK/specs/probe.toml" >/dev/null
probe_ms=""
deadline=$((SECONDS + 60))
while ((SECONDS < deadline)); do
  # First failed probe, then the first passing probe after it (a new container).
  probe_ms="$(ctl show probe --json | jq -r '
    .probes | sort_by(.at_ms) as $p
    | ([$p[] | select(.ok | not)][0]) as $fail
    | select($fail != null)
    | ([$p[] | select(.ok and .at_ms > $fail.at_ms)][0]) as $ok
    | select($ok != null)
    | $ok.at_ms - $fail.at_ms' 2>/dev/null || true)"
  [[ -n "$probe_ms" ]] && break
  sleep 0.2
done
[[ -n "$probe_ms" ]] || { say "no recovery seen"; exit 1; }
# The spec's bound: retries-1 more failures an interval apart (the last may take the
# whole timeout), the restart (backoff 100ms), then the new container's first probe
# one interval after it starts.
bound_ms=$(( (3 - 1) * 1000 + 500 + 100 + 1000 ))
say "first failed probe -> healthy again: ${probe_ms} ms (bound ${bound_ms} ms + container start)"

ratio_dflt="$(awk -v a="$dflt_median" -v b="$docker_median" 'BEGIN { printf "%.2f", a / b }')"
write_bench_section restart "$OUT" <<EOF
## Crash to running again, and failed probe to healthy (\`bash bench/restart.sh\`)

Release build, \`fleet-test-agent:1\` with \`CRASH_AFTER=1s\`; $SAMPLES departments (or
containers) at once, the first restart of each, from Docker's own event timestamps
(\`die\` to the next \`start\`), median of the $SAMPLES. Docker's \`--restart on-failure\`
(its first delay is 100 ms) and fleet-agentd with \`restart.backoff = "100ms"\` are
measured side by side, $ROUNDS rounds in one run; Docker's containers are made like the
daemon's: a port published on 127.0.0.1 and the HostConfig of a container the daemon
made in this run (\`docker run -p 127.0.0.1:PORT:8080 ${BASELINE_FLAGS[*]}\`), so both
start the same container. Both sides start their five one after
the other: \`docker run -d\` returns once its container runs, and the daemon's
departments are applied one by one, the next once the last one's container runs
("dies within": how close together the five crashes came).
$(machine_line)

| round | Docker on-failure: median (samples) | fleet-agentd, backoff 100ms: median (samples) | ratio | where fleet-agentd's time went (medians) |
|---|---|---|---|---|
${rows}
**Ratio to Docker: ${ratio_median}** (median of the $ROUNDS rounds; Docker ${docker_median} ms,
fleet-agentd ${fast_median} ms as medians of the round medians). With the default
\`restart.backoff = "1s"\`: ${dflt_median} ms ($(paste -sd' ' <<<"$dflt_ms")), ${ratio_dflt}x
Docker's median; that default is deliberate (a crash loop should not hammer the host).

How a restart goes (daemon/src/supervisor/machine.rs, department.rs): the \`die\` event
carries \`exitCode\`, so the department task judges the exit from the event alone (an
exit 137 or 0 is still inspected first: a late OOM report, an engine on its way
down); the backoff is counted from the \`die\`'s own time, minus up to 20% jitter (80 to
100 ms against Docker's 100 ms); when the timer fires, the start call is the first
Docker call, not held by the start gate (only first starts are), and the restart
record and events are written after it. The breakdown column says what is left:
the event's trip to the task, the backoff, and the engine's own \`start\`, which
fleet-agentd asks for through the API while Docker's restart runs inside the engine.

First failed probe to the replacement's first passing probe (interval 1s, timeout
500ms, retries 3, backoff 100ms): **${probe_ms} ms**, against a bound of
${bound_ms} ms from the spec ((retries - 1) x interval + timeout + backoff + one interval
for the new container's first probe) plus the container's own start.
EOF
say "wrote $OUT"

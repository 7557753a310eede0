# Shared helpers of the benchmark scripts (sourced, not run).

# write_bench_section NAME FILE: replaces the part of FILE between
# `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` with standard input, or appends
# it when the markers are missing. Every benchmark owns one section, so running one
# script never erases another's results.
write_bench_section() {
  local name="$1" file="$2" body tmp
  body="$(cat)"
  mkdir -p "$(dirname "$file")"
  [[ -f "$file" ]] || printf '# Benchmarks\n\nEach section is written by the script it names; rerun that script to refresh it.\n' >"$file"
  tmp="$(mktemp "$file.XXXXXX")"
  BODY="$body" awk -v start="<!-- bench:$name -->" -v end="<!-- /bench:$name -->" '
    $0 == start { print; print ENVIRON["BODY"]; skipping = 1; found = 1; next }
    $0 == end { skipping = 0 }
    !skipping { print }
    END { if (!found) { print ""; print start; print ENVIRON["BODY"]; print end } }
  ' "$file" >"$tmp"
  mv "$tmp" "$file"
}

# machine_line: one line naming the machine and build the figures came from.
machine_line() {
  printf 'Run: %s, %s CPUs, %s RAM, kernel %s, Docker %s, fleet-agent %s.\n' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" \
    "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)" \
    "$(uname -r)" "$(docker version --format '{{.Server.Version}}' 2>/dev/null || echo none)" \
    "$(git describe --always --dirty 2>/dev/null || echo unknown)"
}

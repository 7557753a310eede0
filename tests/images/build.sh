#!/usr/bin/env bash
# Builds the static test agent and the FROM scratch test images:
#   fleet-test-agent:1    AGENT_VERSION=1
#   fleet-test-agent:2    AGENT_VERSION=2
#   fleet-test-agent:bad  NEVER_HEALTHY=1 (/health always 503)
# Idempotent: an image whose label records the current binary's SHA-256 is kept.
# TAG_PREFIX=drain- builds fleet-test-agent:drain-1/-2/-bad instead: tests that
# need a newer agent than other worktrees build (tests/tests/drain.rs) use
# their own tags, so a rebuild from another checkout cannot swap the image
# under them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
agent_dir="$(cd "$here/../test-agent" && pwd)"
target=x86_64-unknown-linux-gnu

echo "test images: building the static test agent"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --target "$target" \
  --manifest-path "$agent_dir/Cargo.toml"
binary="$agent_dir/target/$target/release/test-agent"
sha="$(sha256sum "$binary" | cut -d' ' -f1)"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/test-agent"
cp "$here/Dockerfile" "$context/Dockerfile"

build_image() {
  local tag="$1"; shift
  local have
  have="$(docker image inspect --format '{{ index .Config.Labels "fleet-test-agent.binary-sha256" }}' \
    "fleet-test-agent:$tag" 2>/dev/null || true)"
  if [[ "$have" == "$sha" ]]; then
    echo "test images: fleet-test-agent:$tag is up to date"
    return
  fi
  echo "test images: building fleet-test-agent:$tag"
  local out
  # The legacy builder warns about its deprecation on every run; show output only on failure.
  if ! out="$(docker build --build-arg "BINARY_SHA256=$sha" "$@" -t "fleet-test-agent:$tag" "$context" 2>&1)"; then
    echo "$out" >&2
    echo "test images: docker build of fleet-test-agent:$tag failed" >&2
    exit 1
  fi
}

prefix="${TAG_PREFIX:-}"
build_image "${prefix}1" --build-arg AGENT_VERSION=1
build_image "${prefix}2" --build-arg AGENT_VERSION=2
build_image "${prefix}bad" --build-arg AGENT_VERSION=1 --build-arg NEVER_HEALTHY=1

#!/usr/bin/env bash
# Builds what the package tests cache (the debootstrap'ed Debian root and its
# Docker image, see lib.sh) ahead of them. scripts/test.sh starts it in the
# background while the workspace compiles: debootstrap mostly waits on the
# network and the disk, the compiler on the CPU. The tests take the same locks,
# so they wait for it, or build the cache themselves if this failed.
source "$(dirname "$0")/lib.sh"

ensure_image
log "ready: $PKGTEST_BASE, $PKGTEST_IMAGE"

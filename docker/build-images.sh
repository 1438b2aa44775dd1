#!/usr/bin/env bash
# Builds the bay-tracker and bay-proxy images from a release build of this checkout:
#
#   docker/build-images.sh [TAG]        # default tag: latest
#
# Environment: BASE (default debian:bookworm-slim; see docker/Dockerfile), DOCKER (the client,
# default docker), CARGO_TARGET_DIR (default target). The build context is a temporary
# directory holding just the two binaries and the healthcheck script, so no .dockerignore is
# needed and nothing of the source tree is sent to the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-latest}
base=${BASE:-debian:bookworm-slim}
docker=${DOCKER:-docker}
target=${CARGO_TARGET_DIR:-target}

cargo build --release --bins

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$target/release/bay-tracker" "$target/release/bay-proxy" "$context/"
install -m 0755 docker/healthcheck.sh "$context/healthcheck.sh"

for image in bay-tracker bay-proxy; do
  "$docker" build --file docker/Dockerfile --build-arg "BASE=$base" --target "$image" \
    --tag "$image:$tag" "$context"
done
echo "built bay-tracker:$tag and bay-proxy:$tag from $base"

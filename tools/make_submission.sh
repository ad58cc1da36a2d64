#!/usr/bin/env bash
# Build the challenge image and save it as the challenge takes a submission: <teamname>.tar.gz.
#   usage: bash tools/make_submission.sh TEAMNAME [OUT_DIR]
# The base image is pinned to one Python patch release on one Debian release; docker is used where it
# has an engine, podman otherwise (this repository's machines).
set -euo pipefail
team=${1:?usage: bash tools/make_submission.sh TEAMNAME [OUT_DIR]}
out=$(realpath -m "${2:-.}")
base=${BASE_IMAGE:-python:3.11.7-slim-bookworm}
cd "$(dirname "$0")/.."
if docker info >/dev/null 2>&1; then engine=docker; elif command -v podman >/dev/null; then engine=podman
else echo "make_submission: no docker engine and no podman" >&2; exit 2; fi
tag="$(echo "$team" | tr '[:upper:]' '[:lower:]'):latest"
"$engine" build --build-arg "BASE_IMAGE=$base" -t "$tag" .
mkdir -p "$out"
"$engine" save "$tag" | gzip -c > "$out/$team.tar.gz.tmp"
mv "$out/$team.tar.gz.tmp" "$out/$team.tar.gz"
echo "make_submission: $out/$team.tar.gz ($(du -h "$out/$team.tar.gz" | cut -f1)), image $tag on $base" >&2
echo "  run a case: $engine load -i $team.tar.gz && $engine container run -m 8G --rm -v \$PWD/inputs:/workspace/inputs" \
     "-v \$PWD/outputs:/workspace/outputs $tag /bin/bash -c 'sh predict.sh'" >&2

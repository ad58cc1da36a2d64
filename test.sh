#!/usr/bin/env bash
# The test command: installs requirements, lints (ruff.toml), then runs the whole suite (slow tests included).
set -uo pipefail
cd "$(dirname "$0")"
bash setup.sh || exit 1
python -m ruff check . || exit 1
python -m pytest "$@"
rc=$?
# pytest exit 5 = "no tests collected": that is a failure for us
[ "$rc" = 5 ] && { echo "test.sh: no tests were collected" >&2; exit 1; }
exit $rc

#!/bin/sh
# Challenge entrypoint: every /workspace/inputs/*.npz -> /workspace/outputs/<same name>.npz (segs).
# Exit code: 0 all cases done, 1 some case failed (the others are still written), 2 could not run.
cd "$(dirname "$0")" && exec python infer.py -i /workspace/inputs -o /workspace/outputs "$@"

#!/usr/bin/env bash
# The demo: installs requirements, runs the default int8 model (models/default) through infer.py on the
# bundled demo cases (demo/imgs), then prints per-case time and DSC/NSD against demo/gts.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
out=runs/demo
python infer.py -i demo/imgs -o "$out" --overwrite --gts demo/gts "$@"

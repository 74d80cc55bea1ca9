#!/usr/bin/env bash
# Compares the package's verl and TRL drop-ins with verl's and TRL's own functions: the pinned
# peers of scripts/install-peers.sh (verl and TRL, cached), the PyTorch venv from
# scripts/install-torch.sh, the package itself (`pip install ./bindings/python`), then runs
# benches/peers/peer_check.py on random batches (CPU).
#
#   scripts/peer-check.sh [--batches 20] [--json peers-check.json]
#
# The peers live in $RECAP_PEERS_DIR (default ~/.cache/recap-kernels/peers-<pins hash>); a cold
# install downloads about 300 MB (ray, pyarrow, transformers), a warm one reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

peers_line=$(scripts/install-peers.sh)   # the pinned verl and TRL (one place)
export "${peers_line?}"   # PEERS=<dir>
peers=$PEERS
python_line=$(scripts/install-torch.sh)
export "${python_line?}"   # PYTHON=<path>
"$PYTHON" -m pip install --quiet --disable-pip-version-check ./bindings/python >&2
cd "$(mktemp -d)"   # the installed package, not the source tree
RECAP_OLD_VERL="$peers/older" PYTHONPATH="$peers${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -W ignore "$root/benches/peers/peer_check.py" "$@"

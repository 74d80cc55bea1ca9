#!/usr/bin/env bash
# Installs the peers the drop-ins are tested against, pinned here and nowhere else: verl and TRL
# with what importing verl.trainer.ppo.core_algos, verl's trainers (ray_trainer, the v1 trainer) and
# its FSDP engine, and running trl.GRPOTrainer on the CPU needs,
# without their other training dependencies (--no-deps), into a cached directory beside the
# PyTorch venv of scripts/install-torch.sh; and the older verl API (0.7) in its `older/`. Prints the
# line `PEERS=<dir>` on stdout: put it first on PYTHONPATH.
#
#   peers_line=$(scripts/install-peers.sh); export "$peers_line"
#   PYTHONPATH="$PEERS" python -m pytest bindings/python/tests/peers
#
# The directory is $RECAP_PEERS_DIR (default ~/.cache/recap-kernels/peers-<pins hash>); a cold
# install downloads about 300 MB (ray, pyarrow, transformers), a warm one reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

pins=(
  verl==0.9.1 trl==1.16.0
  # what importing them and running GRPOTrainer on the CPU needs
  accelerate==1.15.0 antlr4-python3-runtime==4.9.3 attrs==26.1.0 certifi==2026.10.19.post1
  cloudpickle==3.1.3 codetiming==1.4.0 datasets==5.2.0 dill==0.4.1 h11==0.16.0 httpcore2==2.16.2
  httpx2==2.16.2 huggingface-hub==2.4.0 hydra-core==1.3.8 idna==3.20 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 msgpack==1.2.4 multiprocess==0.70.19 omegaconf==2.3.0
  orjson==3.13.0 pandas==3.1.1 protobuf==7.36.2 pyarrow==26.0.1 python-dateutil==4.0.0 pyvers==0.2.3
  pyyaml==6.0.4 ray==2.60.0 referencing==0.37.0 regex==2026.11.19 requests==2.34.2
  rpds-py==2026.9.1 safetensors==0.8.0 sentencepiece==0.2.3 tensordict==0.15.3 tokenizers==0.23.3
  tqdm==4.70.1 transformers==5.24.0 truststore==0.10.5 urllib3==2.8.0 xxhash==4.1.0
  # what importing verl's trainer (ray_trainer) and FSDP engine adds
  annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 cachetools==8.0.3 click==8.5.1
  fastapi==0.165.0 opentelemetry-api==1.45.3 peft==0.21.2 pillow==13.0.0 pydantic==2.14.4
  pydantic-core==2.50.5 starlette==1.10.0 torchdata==0.11.0 typing-inspection==0.4.5 uvicorn==0.55.0
  # what importing verl's v1 trainer (TransferQueue, its reward loop) adds; hydra 1.3 wants these
  # omegaconf and antlr4 versions, so hydra's compose API builds verl's real config
  TransferQueue==0.1.11 aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 frozenlist==1.8.0
  msgspec==0.23.0 multidict==7.2.1 prometheus-client==0.26.0 propcache==0.5.4 psutil==7.2.2
  pyzmq==27.3.0 yarl==1.25.1
)
# the older verl API's rollout_token_veto_threshold (gone from verl 0.8 on), beside it
old_verl=verl==0.7.0
hash=$(echo "${pins[*]} $old_verl" | sha256sum | cut -c1-12)
peers="${RECAP_PEERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recap-kernels/peers-$hash}"

python_line=$(scripts/install-torch.sh)
export "${python_line?}"   # PYTHON=<path>
if [ ! -f "$peers/.complete" ]; then
  echo "install-peers: installing ${#pins[@]} packages into $peers" >&2
  rm -rf "$peers"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$peers" "${pins[@]}" >&2
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$peers/older" "$old_verl" >&2
  touch "$peers/.complete"
fi
echo "PEERS=$peers"

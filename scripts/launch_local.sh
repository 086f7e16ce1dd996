#!/usr/bin/env bash
# Run a command as N local JAX processes (a multi-host run on one machine), e.g.
#   scripts/launch_local.sh 2 advalign-jax evaluate --config configs/adversarial_alignment.py:runlocal --config.workdir=DIR
# Each process gets JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1), JAX_NUM_PROCESSES, JAX_PROCESS_ID and
# the CPU collectives; --config.distributed=true is added. Output lines are prefixed with the process id; when
# one process fails the others are stopped and the first non-zero exit code is returned.
# (`python -m advalign_jax.launch --help` for the options.)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -x "$here/.venv/bin/python" ]]; then py="$here/.venv/bin/python"; else py="${PYTHON:-python3}"; fi
if [[ -x "$here/.venv/bin/advalign-jax" ]]; then export PATH="$here/.venv/bin:$PATH"; fi
exec "$py" -m advalign_jax.launch "$@"

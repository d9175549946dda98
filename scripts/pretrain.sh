#!/usr/bin/env bash
# torchrun launcher for pretraining on this node: NGPU processes (default: every visible GPU, or 1
# process on a CPU-only machine); every argument is passed on as a Hydra override.
#
#   NGPU=8 scripts/pretrain.sh model=small parallel.grad_accum=4 hydra.run.dir=runs/small
set -euo pipefail
cd "$(dirname "$0")/.."
ngpu=${NGPU:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$ngpu" -m trainer.pretrain "$@"

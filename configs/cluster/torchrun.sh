#!/bin/bash
# Train any config with torchrun (no SLURM): one process per GPU on each node; Lightning reads
# torchrun's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT itself.
#
# one node, 8 GPUs:
#   configs/cluster/torchrun.sh configs/clip/vit_b32_laion.yaml
# two nodes (run on each, with the first node's address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 configs/cluster/torchrun.sh configs/text/gpt2_124m.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 configs/cluster/torchrun.sh configs/text/gpt2_124m.yaml
#
# `--ckpt_path last` resumes the run's newest checkpoint (or starts it): rerun the same
# command after a failure. Extra arguments go to `multimodal fit`.
set -euo pipefail
CONFIG=${1:?usage: configs/cluster/torchrun.sh CONFIG.yaml [multimodal fit flags]}
shift
NPROC=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}

torchrun \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m multimodal fit --config "$CONFIG" \
    --trainer.num_nodes "${NNODES:-1}" --trainer.devices "$NPROC" \
    --ckpt_path last \
    "$@"

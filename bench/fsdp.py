"""Per-process memory of parameters, gradients and AdamW state: FSDP2 (`multimodal.train.
shard_model`: every transformer block, then the root) vs DDP, on 2 CPU processes (gloo), in
the same run; never a timed test.

    python bench/fsdp.py [--processes 2]

The bytes are counted from the tensors each process holds after one training step (its
parameter shards, their gradients and the optimizer's exp_avg / exp_avg_sq), so the figures
are exact and blind to other work on the machine. DDP keeps everything on every process;
FSDP2 keeps 1/N of each sharded tensor (plus the replicated scalars: logit scale). The model
is a CLIP with a ViT-B/32-shaped image tower cut to 6 layers and a 6-layer 512-wide text tower.
Goal: FSDP2 / DDP <= 0.6 on 2 processes.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.models.losses import clip_loss
from multimodal.train import shard_model
from text import TextConfig, TextEncoder
from vision import ViT, ViTConfig

BATCH = 4  # per process


def build() -> CLIP:
    torch.manual_seed(0)
    image = ViT(ViTConfig(image_size=224, patch_size=32, dim=768, n_layers=6, n_heads=12))
    stack = TransformerConfig(dim=512, n_layers=6, n_heads=8, causal=True, max_positions=77)
    text = TextEncoder(TextConfig(vocab_size=49408, transformer=stack))
    return CLIP(image, text, embed_dim=512)


def local_bytes(t: Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def step_and_measure(model: nn.Module, params: list[nn.Parameter]) -> dict[str, int]:
    """One AdamW step on a random batch; bytes of what this process then holds."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(BATCH, 3, 224, 224)
    ids = torch.randint(1, 49408, (BATCH, 16))
    out = model(images, ids)
    clip_loss(out.image_features, out.text_features, out.logit_scale).backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(local_bytes(v) for v in state if v.dim() > 0),
    }


def worker(rank: int, world: int, port: int, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = build()
        ddp = DistributedDataParallel(model)
        results[("ddp", rank)] = step_and_measure(ddp, list(model.parameters()))
        del ddp, model
        model = build()
        shard_model(model, init_device_mesh("cpu", (world,)))
        results[("fsdp", rank)] = step_and_measure(model, list(model.parameters()))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    world = parser.parse_args().processes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(world, port, results), nprocs=world, join=True)
        results = dict(results)
    mib = 2**20
    print(f"CLIP (ViT-B/32 image tower, 6 + 6 layers), {world} processes, per process (MiB):")
    print(f"{'':>12} {'DDP':>9} {'FSDP2':>9} {'ratio':>7}")
    for key in ("parameters", "gradients", "optimizer"):
        ddp = max(results[("ddp", r)][key] for r in range(world))
        fsdp = max(results[("fsdp", r)][key] for r in range(world))
        print(f"{key:>12} {ddp / mib:9.1f} {fsdp / mib:9.1f} {fsdp / ddp:7.3f}")
    totals = {
        name: max(
            results[(name, r)]["parameters"] + results[(name, r)]["optimizer"] for r in range(world)
        )
        for name in ("ddp", "fsdp")
    }
    ratio = totals["fsdp"] / totals["ddp"]
    print(
        f"parameters + optimizer state: DDP {totals['ddp'] / mib:.1f} MiB, FSDP2 "
        f"{totals['fsdp'] / mib:.1f} MiB per process: FSDP2 / DDP = {ratio:.3f} (goal <= 0.6)"
    )


if __name__ == "__main__":
    main()

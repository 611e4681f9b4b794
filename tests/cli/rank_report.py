"""A callback for the cluster-launch test: each rank writes what it saw of the run."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import torch


class RankReport(pl.Callback):
    """Writes `rank<global rank>.json` into the run folder at the end of `fit`: the rank, the
    world size, the cluster environment, and the sum over ranks of (rank + 1), which only
    processes of one process group can compute together."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = torch.tensor(float(trainer.global_rank + 1))
        total = trainer.strategy.reduce(mine, reduce_op="sum")
        report = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "rank_sum": float(total),
            "global_step": trainer.global_step,
        }
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(report))

"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for every task: each transformer block of
every tower, decoder and fusion stack is its own unit (its parameters are all-gathered just
before it runs and freed after), then the task itself is the root unit that holds the rest
(embeddings, projections, heads, the logit scale).

`FSDP2Strategy` is Lightning's `ModelParallelStrategy` with three changes:
- data parallel over every process (no tensor parallel dimension), on any device: CPU + gloo
  works, which is what the tests run;
- it holds the FSDP options (mixed precision policy, CPU offload, resharding) that the
  tasks' `configure_model` applies;
- the task is the FSDP root, so its steps are called through the module (`task(...)` ->
  `training_step`): FSDP's root hooks then gather the root's parameters before the step and
  reduce their gradients in backward. Plain `ModelParallelStrategy` calls `training_step`
  directly, which would leave the root's parameters sharded and their gradients unreduced.

Checkpoints are Lightning's distributed checkpoint folders (one shard file per rank plus a
`meta.pt`); `trainer.fit(ckpt_path=folder)` resumes from one, and
`python -m lightning.fabric.utilities.consolidate_checkpoint folder` writes a single file.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from multimodal.train.blocks import transformer_blocks
from multimodal.train.checkpoint_file import config_classes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class FSDPOptions:
    """How `shard_model` shards.

    param_dtype: dtype of the gathered parameters that compute runs in ("bfloat16",
        "float16", "float32"; None: as stored, fp32); the sharded master copy stays fp32.
    reduce_dtype: dtype of the gradient reduce-scatter (None: param_dtype). bf16 params with
        fp32 reduction: param_dtype="bfloat16", reduce_dtype="float32".
    cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory.
    reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3;
        gathered again in backward); False keeps them until backward (ZeRO-2-like).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = None
    cpu_offload: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"FSDPOptions.{name}={value!r} must be one of {list(DTYPES)}")

    def policies(self) -> dict[str, Any]:
        """The mixed precision and offload keyword arguments of `fully_shard`."""
        mp = MixedPrecisionPolicy(
            param_dtype=DTYPES.get(self.param_dtype or ""),
            reduce_dtype=DTYPES.get(self.reduce_dtype or ""),
        )
        kwargs: dict[str, Any] = {"mp_policy": mp}
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        return kwargs


def _average_gradient(group: dist.ProcessGroup) -> Any:
    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad / dist.get_world_size(group)

    return hook


def shard_model(model: nn.Module, mesh: DeviceMesh, options: FSDPOptions | None = None) -> int:
    """`fully_shard` every block of `model` (`transformer_blocks`), then `model` itself.

    Scalar parameters (a logit scale, Flamingo's gates) cannot be sharded: they stay
    replicated and their gradients are averaged over `mesh` by a hook, as DDP would.
    Returns the number of sharded blocks; a model already sharded is left as it is.
    """
    if isinstance(model, FSDPModule):
        return sum(isinstance(b, FSDPModule) for b in transformer_blocks(model))
    options = options or FSDPOptions()
    scalars = {p for p in model.parameters() if p.dim() == 0}
    kwargs = {"mesh": mesh, "ignored_params": scalars, **options.policies()}
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, reshard_after_forward=options.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    group = mesh.get_group()
    for p in scalars:
        if p.requires_grad:
            p.register_hook(_average_gradient(group))
    return len(blocks)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes, for the platform's tasks (their
    `configure_model` shards with this strategy's options); CPU (gloo) and GPU.

    YAML: `trainer: {strategy: {class_path: multimodal.train.FSDP2Strategy, init_args:
    {param_dtype: bfloat16, reduce_dtype: float32}}, devices: 2}`.

    Args:
        param_dtype, reduce_dtype, cpu_offload, reshard_after_forward: see `FSDPOptions`.
        save_distributed_checkpoint: one shard file per rank in a checkpoint folder (True),
            or one full file assembled on rank 0 (False).
        process_group_backend: default nccl on GPUs, gloo on CPUs.
        timeout: of the collectives.
    """

    def __init__(
        self,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.options = FSDPOptions(param_dtype, reduce_dtype, cpu_offload, reshard_after_forward)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        """Lightning's loading, with the platform's config classes allowed in the metadata
        (a task built in Python keeps e.g. `OptimConfig` in its hyper-parameters)."""
        with torch.serialization.safe_globals(list(config_classes())):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _through_root(self, method: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        """Call `method` of the task through its `__call__`, so the FSDP root hooks run."""
        assert self.model is not None and self.lightning_module is not None
        with context:
            return self._forward_redirection(
                self.model, self.lightning_module, method, *args, **kwargs
            )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        context = self.precision_plugin.train_step_context()
        return self._through_root("training_step", context, *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        context = self.precision_plugin.val_step_context()
        return self._through_root("validation_step", context, *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        context = self.precision_plugin.test_step_context()
        return self._through_root("test_step", context, *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        context = self.precision_plugin.predict_step_context()
        return self._through_root("predict_step", context, *args, **kwargs)


# `--trainer.strategy fsdp2` (a class path given as a string is taken for a strategy name)
StrategyRegistry.register(
    "fsdp2",
    FSDP2Strategy,
    description="FSDP2 (fully_shard) of every transformer block and the task root",
    override=True,
)

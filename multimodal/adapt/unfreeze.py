"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT): train the top of the model first, then
release one block per tower from the top every few epochs, until everything trains.

How it meets the optimiser: the callback freezes in `on_fit_start`, which Lightning calls
after `configure_optimizers` (setup -> configure_model -> strategy.setup, which builds the
optimiser and wraps the model -> on_fit_start -> restore of a checkpoint's training state ->
on_train_epoch_start). So the optimiser and its learning-rate schedule hold every parameter
from the first step, in the groups they always have (layer-wise decay included); a frozen
parameter gets no gradient, and AdamW skips parameters without one (no update, no weight
decay, no moment state), until unfreezing flips `requires_grad`. Parameters frozen before
`on_fit_start` (a locked LiT tower, a base model under adapters) are not in the optimiser, and
the callback never touches them.

The schedule is a function of the epoch alone, applied at each `on_train_epoch_start`, so a
run resumed from a checkpoint (mid-epoch included) continues it without saved state.

Under DDP, parameters that get no gradient need `strategy: ddp_find_unused_parameters_true`:
the DDP reducer is built in strategy.setup, while everything still requires a gradient.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from multimodal.adapt.layer_decay import layer_depths


class GradualUnfreezing(Callback):
    """Unfreeze one depth of every tower every `every_n_epochs` epochs, from the top.

    Depths are those of `multimodal.adapt.layer_decay.layer_depths`: 0 is what follows the
    blocks (heads, final norm, projections, logit scale) and everything outside the towers,
    k the k-th block from the top of each tower, N + 1 the embeddings under N blocks. In
    epoch e the parameters of depth <= stage train, stage = e // every_n_epochs (+ 1 without
    `start_frozen`); towers of different depth each release their next block together.

    Args:
        every_n_epochs: epochs between two unfreezing steps.
        start_frozen: True: the first `every_n_epochs` epochs train only the top (depth 0);
            False: the top block of each tower trains from the start too.

    Logs `adapt/trainable_params` (parameters, i.e. scalars, trainable this epoch) and
    `adapt/unfrozen_depth` at each epoch start.
    """

    def __init__(self, every_n_epochs: int = 1, start_frozen: bool = True) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"GradualUnfreezing.every_n_epochs={every_n_epochs} must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.start_frozen = start_frozen
        self._managed: dict[str, tuple[nn.Parameter, int]] = {}  # name -> (param, depth)

    def unfrozen_depth(self, epoch: int) -> int:
        """The deepest depth that trains in `epoch` (0-based)."""
        return epoch // self.every_n_epochs + (0 if self.start_frozen else 1)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take charge of the parameters the optimisers hold, and apply the first epoch's
        schedule (which the sanity check's validation also sees)."""
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        optimised = {id(p) for group in groups for p in group["params"]}
        depths = layer_depths(pl_module)
        self._managed = {}
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) not in optimised:
                raise ValueError(
                    f"GradualUnfreezing: trainable parameter {name!r} is not in the optimiser; "
                    "it needs one built over every parameter it will unfreeze"
                )
            self._managed[name] = (p, depths[name][0])
        self._apply(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        depth = self._apply(trainer.current_epoch)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        pl_module.log("adapt/trainable_params", float(trainable), on_step=False, on_epoch=True)
        pl_module.log("adapt/unfrozen_depth", float(depth), on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave the model as it came: every parameter the callback froze trains again."""
        for p, _ in self._managed.values():
            p.requires_grad_(True)

    def _apply(self, epoch: int) -> int:
        depth = self.unfrozen_depth(epoch)
        for p, d in self._managed.values():
            p.requires_grad_(d <= depth)
        return depth

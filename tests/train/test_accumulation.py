"""`accumulate: K` (GradCache): K micro-batches of B give the loss and gradients of ONE batch of
K x B, for the CLIP and SigLIP losses and CoCa's contrastive term, on one process, through a
Lightning Trainer and under 2-process DDP, where Lightning's accumulate_grad_batches does not."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader

from multimodal.layers import TransformerConfig
from multimodal.models import CLIP, Captioner, ITMHead
from multimodal.models.losses import clip_loss, siglip_loss
from multimodal.tasks import Captioning, ContrastivePretraining, OptimConfig
from multimodal.train import Embedded, grad_cache
from tests.helpers import quiet_trainer
from text import DecoderLM, TextConfig, TextEncoder
from vision import ViT, ViTConfig

Batch = dict[str, Tensor]
# lr large and eps=1: AdamW's first step, lr * g / (|g| + eps), then moves each parameter in
# proportion to its gradient (with a small eps it would be lr * sign(g), blind to its size)
OPTIM = OptimConfig(lr=0.5, eps=1.0, weight_decay=0.0)
CLIP_NORM = 0.05  # below the tiny models' gradient norms: the clipping acts


def tiny_clip(loss: str = "clip", dropout: float = 0.0, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    block = dict(n_layers=1, n_heads=2, dropout=dropout)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, **block))
    text = TextEncoder(
        TextConfig(
            vocab_size=40,
            transformer=TransformerConfig(
                dim=24, causal=True, position="learned", max_positions=8, **block
            ),
        )
    )
    bias = {"init_logit_bias": -2.0, "init_logit_scale": 10.0} if loss == "siglip" else {}
    return CLIP(vit, text, embed_dim=16, **bias)


def image_text(n: int, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(8).expand(n, 8) < torch.randint(3, 9, (n, 1), generator=g)
    return {
        "images": torch.randn(n, 3, 16, 16, generator=g),
        "input_ids": torch.randint(3, 40, (n, 8), generator=g),
        "attention_mask": mask,
    }


def split(batch: Batch, k: int) -> list[Batch]:
    return [
        dict(zip(batch, parts, strict=True))
        for parts in zip(*(v.chunk(k) for v in batch.values()), strict=True)
    ]


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = 1e-5):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=1e-5, msg=name)


def clip_loss_fn(loss: str):
    """(features, shared) -> the loss, and the model's outputs as `Embedded`."""
    if loss == "siglip":
        return lambda f, s: siglip_loss(f[0], f[1], s[0], s[1])
    return lambda f, s: clip_loss(f[0], f[1], s[0])


def embedded(model: CLIP, batch: Batch) -> Embedded:
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    shared = (out.logit_scale,) if out.logit_bias is None else (out.logit_scale, out.logit_bias)
    return Embedded((out.image_features, out.text_features), shared)


# ---------------------------------------------------------------- the routine, one process


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_grad_cache_equals_one_big_batch(loss: str):
    model, big, loss_fn = tiny_clip(loss), image_text(16), clip_loss_fn(loss)
    out = embedded(model, big)
    expected_loss = loss_fn(out.features, out.shared)
    expected_loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    result = grad_cache(split(big, 4), lambda b: embedded(model, b), loss_fn)
    torch.testing.assert_close(result.loss, expected_loss.detach(), atol=1e-5, rtol=1e-5)
    assert_same(grads(model), expected)
    assert "logit_scale" in expected  # reached once, not K times

    # Lightning's accumulate_grad_batches: the mean of 4 losses over 4 negatives each
    with torch.no_grad():
        micro_mean = sum(loss_fn(*embedded(model, b)[:2]) for b in split(big, 4)) / 4
    assert abs(float(micro_mean) - float(expected_loss.detach())) > 0.1


def test_grad_cache_replays_each_micro_batch_dropout():
    model, big, loss_fn = tiny_clip(dropout=0.3), image_text(12), clip_loss_fn("clip")
    torch.manual_seed(7)  # reference: the same masks, every micro-batch's graph kept
    outs = [embedded(model, b) for b in split(big, 3)]
    features = tuple(torch.cat(parts) for parts in zip(*(o.features for o in outs), strict=True))
    expected_loss = loss_fn(features, outs[0].shared)
    expected_loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    result = grad_cache(split(big, 3), lambda b: embedded(model, b), loss_fn)
    torch.testing.assert_close(result.loss, expected_loss.detach(), atol=1e-5, rtol=1e-5)
    assert_same(grads(model), expected)


# ---------------------------------------------------------------- through a Lightning Trainer


class GradsBeforeStep(Callback):
    """The gradients (after any DDP all-reduce, before clipping) at each optimiser step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(grads(pl_module))


def fit(task: LightningModule, batches: list[Batch], **trainer_kwargs) -> tuple[Trainer, list]:
    capture = GradsBeforeStep()
    callbacks = [capture, *trainer_kwargs.pop("callbacks", [])]
    trainer = quiet_trainer(callbacks=callbacks, **{"max_epochs": 1, **trainer_kwargs})
    trainer.fit(task, DataLoader(batches, batch_size=None))
    return trainer, capture.steps


def params(task: LightningModule) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in task.named_parameters()}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_one_accumulated_step_equals_one_big_batch_step(loss: str):
    big = image_text(16)
    reference = ContrastivePretraining(tiny_clip(loss), loss=loss, optim=OPTIM)
    task = ContrastivePretraining(
        copy.deepcopy(reference.model), loss=loss, optim=OPTIM, accumulate=4
    )
    trainer_ref, grads_ref = fit(reference, [big], gradient_clip_val=CLIP_NORM)
    trainer, grads_acc = fit(task, split(big, 4), gradient_clip_val=CLIP_NORM)

    assert len(grads_ref) == len(grads_acc) == 1 and trainer.global_step == 1
    assert_same(grads_acc[0], grads_ref[0])
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads_ref[0].values()]))
    assert norm > 2 * CLIP_NORM  # the clipping changes the step
    assert_same(params(task), params(reference))
    torch.testing.assert_close(
        trainer.callback_metrics["train/loss"], trainer_ref.callback_metrics["train/loss"]
    )
    assert trainer.gradient_clip_val == CLIP_NORM  # the Trainer's setting is given back


def test_schedule_counts_optimizer_steps_and_the_epoch_remainder():
    # 10 micro-batches, K = 4: steps on 4, 4 and the last 2; the cosine reaches 0 at step 3
    task = ContrastivePretraining(tiny_clip(), optim=OptimConfig(lr=0.01), accumulate=4)
    trainer, steps = fit(task, split(image_text(20), 10))
    assert len(steps) == trainer.global_step == task.optimizer_steps() == 3
    assert task.lr_schedulers().last_epoch == 3
    assert task.optimizers().param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_accumulation_refusals():
    with pytest.raises(ValueError, match="accumulate=0"):
        ContrastivePretraining(tiny_clip(), accumulate=0)
    head = ITMHead(image_dim=32, text_dim=24, config=TransformerConfig(dim=16, n_heads=2))
    with pytest.raises(ValueError, match="itm_head"):
        ContrastivePretraining(tiny_clip(), itm_head=head, accumulate=2)
    with pytest.raises(ValueError, match="text_tower"):
        Captioning(captioner(contrastive=False), accumulate=2)
    task = ContrastivePretraining(tiny_clip(), accumulate=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        fit(task, split(image_text(8), 4), accumulate_grad_batches=2)


# ---------------------------------------------------------------- CoCa's contrastive term


def captioner(contrastive: bool = True) -> Captioner:
    torch.manual_seed(0)
    transformer = TransformerConfig(
        dim=32, n_layers=1, n_heads=2, causal=True, cross_attention=True, position="learned",
        max_positions=8,
    )  # fmt: skip
    decoder = DecoderLM(TextConfig(vocab_size=40, transformer=transformer, bos_id=1, eos_id=2))
    image = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2))
    if not contrastive:
        return Captioner(image, decoder)
    text = TextEncoder(
        TextConfig(
            vocab_size=40,
            transformer=TransformerConfig(dim=24, n_layers=1, n_heads=2, max_positions=8),
        )
    )
    return Captioner(image, decoder, text_tower=text, embed_dim=16)


def test_coca_accumulated_step_equals_one_big_batch_step():
    big = image_text(16, seed=3)  # captions of 3 to 8 tokens: micro-batches weigh by tokens
    kwargs = dict(optim=OPTIM, label_smoothing=0.1, contrastive_weight=0.5, val_generate=False)
    reference = Captioning(captioner(), **kwargs)
    task = Captioning(copy.deepcopy(reference.model), accumulate=4, **kwargs)
    trainer_ref, grads_ref = fit(reference, [big])
    trainer, grads_acc = fit(task, split(big, 4))
    assert len(grads_acc) == 1
    assert_same(grads_acc[0], grads_ref[0])
    assert_same(params(task), params(reference))
    for name in ("loss", "caption_loss", "contrastive_loss"):
        torch.testing.assert_close(
            trainer.callback_metrics[f"train/{name}"],
            trainer_ref.callback_metrics[f"train/{name}"],
        )


# ---------------------------------------------------------------- 2-process DDP vs one process

WORLD, K, B = 2, 2, 4  # global batch WORLD * K * B = 16


class CountAllReduces(Callback):
    """Counts DDP's bucket all-reduces (a communication hook doing the default all-reduce;
    Lightning registers `ddp_comm_hook` on CUDA only, so it is registered here)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, self._hook)

    def _hook(self, state, bucket):
        self.calls += 1
        return allreduce_hook(state, bucket)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD))
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    results: dict[str, Tensor] = {}
    for loss in ("clip", "siglip"):
        task = ContrastivePretraining(tiny_clip(loss), loss=loss, optim=OPTIM, accumulate=K)
        local = split(image_text(WORLD * K * B), WORLD * K)[rank * K : (rank + 1) * K]
        counter = CountAllReduces()
        _, steps = fit(
            task,
            local,
            callbacks=[counter],
            devices=WORLD,
            strategy=DDPStrategy(process_group_backend="gloo"),
            use_distributed_sampler=False,
        )
        results[f"{loss}/allreduces"] = torch.tensor(counter.calls)
        results[f"{loss}/steps"] = torch.tensor(len(steps))
        results.update({f"{loss}/grad/{n}": g for n, g in steps[0].items()})
        results.update({f"{loss}/param/{n}": p for n, p in params(task).items()})
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section(results: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {n[len(prefix) :]: v for n, v in results.items() if n.startswith(prefix)}


def test_two_process_ddp_accumulation_equals_one_process_global_batch(tmp_path):
    # fork: the workers inherit the imported modules (spawn would import them again, ~10 s)
    mp.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for loss in ("clip", "siglip"):
        reference = ContrastivePretraining(tiny_clip(loss), loss=loss, optim=OPTIM)
        _, grads_ref = fit(reference, [image_text(WORLD * K * B)])
        for r in ranks:
            assert int(r[f"{loss}/steps"]) == 1
            # the tiny model is one DDP bucket: one all-reduce for the K backward passes
            assert int(r[f"{loss}/allreduces"]) == 1
            assert_same(section(r, f"{loss}/grad/"), grads_ref[0])
            assert_same(section(r, f"{loss}/param/"), params(reference))

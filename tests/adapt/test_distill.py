"""Distillation: the losses against hand computations, the frozen teacher (no gradient, not
optimised, not saved, rebuilt on reload), the tasks' losses, the config through the CLI, and
the teacher's logits under 2-process DDP covering the global batch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from multimodal.adapt.distill import (
    DistillConfig,
    FrozenTeacher,
    clip_distill_loss,
    feature_distill_loss,
    load_teacher,
    soft_target_loss,
)
from multimodal.layers import TransformerConfig
from multimodal.models import CLIP
from multimodal.models.losses import clip_loss
from multimodal.tasks import (
    CausalLMDistillation,
    ClipDistillation,
    ContrastivePretraining,
    OptimConfig,
    TextClassifierDistillation,
    load_task,
)
from multimodal.train.checkpoint_file import read_checkpoint
from tests.helpers import cli_from_config, quiet_trainer
from tests.tasks.test_vision_language_training import data_overrides
from tests.train.test_accumulation import _free_port, image_text
from text import DecoderLM, EncoderLM, TextConfig, TextEncoder
from vision import ViT, ViTConfig

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")
Batch = dict[str, Tensor]


# ---------------------------------------------------------------- hand references


def softmax(x: Tensor) -> Tensor:
    e = (x - x.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def cross_entropy_rows(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_i -sum_j p_ij log q_ij, p = softmax(teacher), q = softmax(student), by hand."""
    return -(softmax(teacher) * softmax(student).log()).sum(dim=-1).mean()


def kl_rows(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-row KL(p || q) = sum_j p_j (log p_j - log q_j), by hand."""
    p, q = softmax(teacher), softmax(student)
    return (p * (p.log() - q.log())).sum(dim=-1)


def logits(*shape: int, seed: int) -> Tensor:
    return 3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- losses


def test_clip_distill_loss_is_the_mean_cross_entropy_of_both_directions():
    s, t = logits(6, 6, seed=1), logits(6, 6, seed=2)
    expected = (cross_entropy_rows(s, t) + cross_entropy_rows(s.T, t.T)) / 2
    torch.testing.assert_close(clip_distill_loss(s, s.T, t, t.T), expected)
    # local rows against global columns: (B, N) logits, the same formula row by row
    s, t = logits(3, 6, seed=3), logits(3, 6, seed=4)
    s2, t2 = logits(3, 6, seed=5), logits(3, 6, seed=6)
    expected = (cross_entropy_rows(s, t) + cross_entropy_rows(s2, t2)) / 2
    torch.testing.assert_close(clip_distill_loss(s, s2, t, t2), expected)


def test_clip_distill_loss_minimum_is_the_teachers_entropy():
    t = logits(5, 5, seed=7)

    def entropy(x: Tensor) -> Tensor:
        p = softmax(x)
        return -(p * p.log()).sum(dim=-1).mean()

    expected = (entropy(t) + entropy(t.T)) / 2
    torch.testing.assert_close(clip_distill_loss(t, t.T, t, t.T), expected)
    other = clip_distill_loss(logits(5, 5, seed=8), logits(5, 5, seed=9), t, t.T)
    assert other > expected + 0.1


def test_clip_distill_loss_temperature_is_t_squared_times_the_loss_at_t():
    s, t, T = logits(4, 4, seed=10), logits(4, 4, seed=11), 2.5
    expected = T**2 * (cross_entropy_rows(s / T, t / T) + cross_entropy_rows(s.T / T, t.T / T)) / 2
    torch.testing.assert_close(clip_distill_loss(s, s.T, t, t.T, temperature=T), expected)


def test_soft_target_loss_is_hintons_kl_batchmean_times_t_squared():
    s, t = logits(8, 5, seed=12), logits(8, 5, seed=13)
    torch.testing.assert_close(soft_target_loss(s, t), kl_rows(s, t).mean())
    # the same as torch's KL with reduction="batchmean"
    torch.testing.assert_close(
        soft_target_loss(s, t),
        F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True),
    )
    T = 3.0
    expected = T**2 * kl_rows(s / T, t / T).mean()
    torch.testing.assert_close(soft_target_loss(s, t, T), expected)
    torch.testing.assert_close(soft_target_loss(s, t, T), T**2 * soft_target_loss(s / T, t / T))
    assert soft_target_loss(t, t, T) == pytest.approx(0.0, abs=1e-6)


def test_soft_target_loss_mask_averages_over_the_kept_positions_only():
    s, t = logits(2, 4, 7, seed=14), logits(2, 4, 7, seed=15)  # (B, T, V)
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]])
    kept = [kl_rows(s[b, i], t[b, i]) for b in range(2) for i in range(4) if mask[b, i]]
    expected = torch.stack(kept).mean()
    torch.testing.assert_close(soft_target_loss(s, t, mask=mask), expected)
    garbage = s.clone()
    garbage[~mask] = 100 * torch.randn(int((~mask).sum()), 7)  # padded rows do not count
    torch.testing.assert_close(soft_target_loss(garbage, t, mask=mask), expected)
    # a student equal to the teacher where it counts: 0
    assert soft_target_loss(torch.where(mask[..., None], t, s), t, mask=mask) == pytest.approx(
        0.0, abs=1e-6
    )


def test_feature_distill_loss_is_the_cosine_distance_through_the_projection():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 6)
    projection = nn.Linear(4, 6, bias=False)
    projected = student @ projection.weight.T
    cosine = (projected * teacher).sum(-1) / (projected.norm(dim=-1) * teacher.norm(dim=-1))
    expected = (1 - cosine).mean()
    torch.testing.assert_close(feature_distill_loss(student, teacher, projection), expected)
    # its minimum: projected student features along the teacher's
    same = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        same.weight.copy_(torch.eye(6))
    assert float(feature_distill_loss(2 * teacher, teacher, same).detach()) == pytest.approx(
        0.0, abs=1e-6
    )


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="another vocabulary"):
        soft_target_loss(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="same batch"):
        clip_distill_loss(
            torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(8, 8), torch.zeros(8, 8)
        )
    with pytest.raises(ValueError, match="mask"):
        soft_target_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), mask=torch.ones(2, 4).bool())


@pytest.mark.parametrize(
    "field, value",
    [("weight", -1.0), ("hard_weight", -0.5), ("feature_weight", -1.0), ("temperature", 0.0)],
)
def test_distill_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"DistillConfig.{field}="):
        DistillConfig(**{field: value})


def test_distill_config_refuses_all_weights_zero():
    with pytest.raises(ValueError, match="all 0"):
        DistillConfig(weight=0.0, hard_weight=0.0)


def test_load_teacher_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        load_teacher(None, None)
    with pytest.raises(ValueError, match="exactly one"):
        load_teacher(nn.Linear(2, 2), "teacher.ckpt")


# ---------------------------------------------------------------- the CLIP task


def tiny_clip(dim: int = 32, embed_dim: int = 16, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    block = dict(n_layers=2, n_heads=2)
    vit = ViT(ViTConfig(image_size=16, patch_size=8, dim=dim, **block))
    text = TextEncoder(
        TextConfig(
            vocab_size=40,
            transformer=TransformerConfig(
                dim=dim, causal=True, position="learned", max_positions=8, **block
            ),
        )
    )
    return CLIP(vit, text, embed_dim=embed_dim)


def clip_task(**kwargs) -> ClipDistillation:
    teacher = tiny_clip(dim=48, embed_dim=24, seed=1)
    return ClipDistillation(tiny_clip(seed=0), teacher=teacher, **kwargs)


def test_clip_distillation_loss_is_the_weighted_sum_of_its_terms():
    config = DistillConfig(weight=0.7, hard_weight=0.3, temperature=2.0, feature_weight=0.5)
    task, batch = clip_task(distill=config), image_text(6)
    loss = task.training_step(batch, 0)

    out = task.model(batch["images"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = task.teacher.module(batch["images"], batch["input_ids"], batch["attention_mask"])
    s = out.logit_scale * out.image_features @ out.text_features.T
    t = ref.logit_scale * ref.image_features @ ref.text_features.T
    T = config.temperature
    distill = T**2 * (cross_entropy_rows(s / T, t / T) + cross_entropy_rows(s.T / T, t.T / T)) / 2
    p = task.feature_projection.weight
    feature = (
        sum(
            (1 - F.cosine_similarity(mine @ p.T, theirs, dim=-1)).mean()
            for mine, theirs in (
                (out.image_features, ref.image_features),
                (out.text_features, ref.text_features),
            )
        )
        / 2
    )
    hard = clip_loss(out.image_features, out.text_features, out.logit_scale)
    expected = 0.3 * hard + 0.7 * distill + 0.5 * feature
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_student():
    task = clip_task(distill=DistillConfig(feature_weight=1.0))
    task.training_step(image_text(6), 0).backward()
    teacher = list(task.teacher.module.parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    student = dict(task.named_parameters())
    assert all(p.grad is not None for p in student.values()), [
        n for n, p in student.items() if p.grad is None
    ]
    assert not {id(p) for p in teacher} & {id(p) for p in student.values()}


def test_teacher_is_frozen_not_optimised_and_not_saved(tmp_path):
    task = clip_task(optim=OptimConfig(lr=1e-2))
    before = {n: p.clone() for n, p in task.teacher.module.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in task.named_parameters()}
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(task, DataLoader([image_text(6, seed=s) for s in range(2)], batch_size=None))

    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in task.parameters()}
    assert not optimised & {id(p) for p in task.teacher.module.parameters()}
    assert not task.teacher.module.training  # Trainer's model.train() left it in eval
    for name, value in task.teacher.module.state_dict().items():
        assert value.equal(before[name]), name
    assert any(not p.detach().equal(student_before[n]) for n, p in task.named_parameters())

    path = tmp_path / "distilled.ckpt"
    trainer.save_checkpoint(path)
    saved = read_checkpoint(path)
    plain = ContrastivePretraining(tiny_clip()).state_dict()
    assert saved["state_dict"].keys() == plain.keys()  # the student's keys, nothing else
    assert saved["hyper_parameters"]["teacher"] is None  # no module pickled in the checkpoint


def test_frozen_teacher_follows_the_students_dtype():
    teacher = FrozenTeacher(nn.Linear(3, 2))
    student = nn.Linear(3, 3).to(torch.bfloat16)
    teacher.follow(student)
    assert teacher.module.weight.dtype == torch.bfloat16
    assert not teacher.module.weight.requires_grad


def test_clip_distillation_refuses_accumulation():
    with pytest.raises(ValueError, match="accumulate=2"):
        clip_task(accumulate=2)


# ---------------------------------------------------------------- logit distillation


def test_causal_lm_distillation_adds_the_masked_soft_target_loss():
    torch.manual_seed(0)

    def decoder(dim: int) -> DecoderLM:
        block = TransformerConfig(dim=dim, n_layers=2, n_heads=2, causal=True, max_positions=8)
        return DecoderLM(TextConfig(vocab_size=20, transformer=block))

    config = DistillConfig(weight=0.6, hard_weight=0.4, temperature=2.0)
    task = CausalLMDistillation(decoder(32), teacher=decoder(48), distill=config)
    ids = torch.randint(5, 20, (3, 8))
    attention = torch.arange(8).expand(3, 8) < torch.tensor([[8], [5], [3]])
    labels = ids.masked_fill(~attention, -100)
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    loss = task.training_step(batch, 0)

    student = task.model(ids, attention_mask=attention)
    teacher = task.teacher.module(ids, attention_mask=attention).logits[:, :-1]
    mask = labels[:, 1:] != -100
    hard = F.cross_entropy(student.logits[:, :-1][mask], labels[:, 1:][mask])
    hard = hard + task.aux_loss_weight * student.aux_loss
    T = config.temperature
    soft = T**2 * kl_rows(student.logits[:, :-1][mask] / T, teacher[mask] / T).mean()
    torch.testing.assert_close(loss, 0.4 * hard + 0.6 * soft, atol=1e-5, rtol=1e-5)


def test_text_classifier_distillation_adds_the_soft_target_loss():
    torch.manual_seed(0)

    def encoder(dim: int) -> EncoderLM:
        block = TransformerConfig(dim=dim, n_layers=2, n_heads=2, max_positions=8)
        return EncoderLM(TextConfig(vocab_size=20, transformer=block))

    from multimodal.tasks import TextClassifier

    teacher = TextClassifier(encoder(48), 3, dropout=0.0)
    task = TextClassifierDistillation(encoder(32), 3, dropout=0.0, teacher=teacher)
    ids, attention = torch.randint(5, 20, (4, 8)), torch.ones(4, 8, dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": attention, "labels": torch.tensor([0, 1, 2, 1])}
    loss = task.training_step(batch, 0)

    student = TextClassifier.forward(task, ids, attention)
    with torch.no_grad():
        reference = teacher.eval()(ids, attention)
    expected = F.cross_entropy(student, batch["labels"]) + kl_rows(student, reference).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert task.teacher.module is teacher and not teacher.training


# ---------------------------------------------------------------- the config through the CLI


def test_config_distills_two_steps_from_a_fit_checkpoint_and_reloads(demo_shards, tmp_path):
    # the teacher: the digits CLIP as `multimodal fit` builds it, saved untrained in the
    # checkpoint format load_task reads (state_dict + the CLI's hyper-parameters)
    data = data_overrides("clip/digits.yaml", demo_shards)  # the CLIP tokenizer for both
    teacher_task = cli_from_config("clip/digits.yaml", *data).model
    teacher_path = tmp_path / "teacher.ckpt"
    hparams = dict(teacher_task.hparams)
    torch.save({"state_dict": teacher_task.state_dict(), "hyper_parameters": hparams}, teacher_path)

    cli = cli_from_config(
        "adapt/clip_distill.yaml",
        *data,
        "--data.init_args.shuffle_buffer", "0",
        "--model.init_args.teacher_checkpoint", str(teacher_path),
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0",
    )  # fmt: skip
    task = cli.model
    teacher = teacher_task.model.state_dict()
    assert all(v.equal(teacher[k]) for k, v in task.teacher.module.state_dict().items())
    assert task.model.image_tower.config.n_layers == 1
    assert teacher_task.model.image_tower.config.n_layers == 2
    cli.trainer.fit(task, cli.datamodule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for name in ("train/distill_loss", "train/contrastive_loss", "val/loss", "val/inbatch_acc"):
        assert math.isfinite(float(metrics[name])), name

    path = tmp_path / "student.ckpt"
    cli.trainer.save_checkpoint(path)
    saved = read_checkpoint(path)["state_dict"]
    assert saved.keys() == task.state_dict().keys()
    assert not any(k.startswith("teacher") for k in saved)
    reloaded = load_task(path)
    assert isinstance(reloaded, ClipDistillation)
    for name, value in task.state_dict().items():
        assert reloaded.state_dict()[name].equal(value), name
    rebuilt = reloaded.teacher.module.state_dict()  # read again from teacher_checkpoint
    assert all(rebuilt[k].equal(v) for k, v in teacher.items())


# ---------------------------------------------------------------- 2-process DDP

WORLD, B = 2, 4


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, Tensor] = {}
    local = {k: v.chunk(WORLD)[rank] for k, v in image_text(WORLD * B).items()}
    for local_loss in (False, True):
        task = clip_task(local_loss=local_loss)
        _, (per_image, per_text) = task.teacher_logits(local)
        terms = task.distill_terms(local, task(local))
        loss = terms["distill_loss"][1]
        loss.backward()
        key = f"local{int(local_loss)}"
        results[f"{key}/per_image"], results[f"{key}/per_text"] = per_image, per_text
        results[f"{key}/loss"] = loss.detach()
        results.update({f"{key}/grad/{n}": p.grad for n, p in task.named_parameters()})
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_teacher_logits_cover_the_global_batch(tmp_path):
    # fork: the workers inherit the imported modules (spawn would import them again)
    mp.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    batch = image_text(WORLD * B)
    for local_loss in (False, True):
        key = f"local{int(local_loss)}"
        task = clip_task(local_loss=local_loss)  # one process, the concatenated batch
        _, (per_image, per_text) = task.teacher_logits(batch)
        assert per_image.shape == (WORLD * B, WORLD * B)
        loss = task.distill_terms(batch, task(batch))["distill_loss"][1]
        loss.backward()
        for rank, r in enumerate(ranks):
            rows = slice(rank * B, (rank + 1) * B) if local_loss else slice(None)
            torch.testing.assert_close(r[f"{key}/per_image"], per_image[rows])
            torch.testing.assert_close(r[f"{key}/per_text"], per_text[rows])
        # the loss and the gradients averaged over ranks (as DDP does) are the global batch's
        mean_loss = sum(r[f"{key}/loss"] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, loss.detach(), atol=1e-5, rtol=1e-5)
        for name, p in task.named_parameters():
            mean_grad = sum(r[f"{key}/grad/{name}"] for r in ranks) / WORLD
            torch.testing.assert_close(mean_grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)

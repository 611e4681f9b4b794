"""Vision-language losses against naive math, open_clip, and a 2-process gloo run vs 1 process."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn

from multimodal.models.distributed import gather_features, rank_and_world
from multimodal.models.losses import (
    caption_loss,
    clip_loss,
    hard_negatives,
    itm_loss,
    siglip_loss,
    vqa_loss,
)


def _normalized(b: int, d: int) -> Tensor:
    return F.normalize(torch.randn(b, d), dim=-1)


# ---------------------------------------------------------------- single-process references


def _clip_reference(img: Tensor, txt: Tensor, scale: float) -> Tensor:
    """1/2 (mean_i -log softmax_j(s x_i.y_j)_i + mean_j -log softmax_i(s x_i.y_j)_j), by loops."""
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        row = [scale * float(img[i] @ txt[j]) for j in range(b)]
        col = [scale * float(img[j] @ txt[i]) for j in range(b)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return torch.tensor(total / (2 * b))


def _siglip_reference(img: Tensor, txt: Tensor, scale: float, bias: float) -> Tensor:
    """-1/B sum_i sum_j log sigmoid(z_ij (s x_i.y_j + b)), by a double loop."""
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return torch.tensor(total / b)


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_open_clip_and_reference(local_loss: bool) -> None:
    img, txt = _normalized(8, 16), _normalized(8, 16)
    scale = torch.tensor(14.3)
    ours = clip_loss(img, txt, scale, local_loss=local_loss)
    theirs = ClipLoss(local_loss=local_loss)(img, txt, scale)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours, _clip_reference(img, txt, 14.3), atol=1e-5, rtol=1e-5)


def test_siglip_loss_matches_loop_reference_and_open_clip() -> None:
    # open_clip's SigLipLoss uses the same conventions (labels 2*I - 1, sum / local batch size,
    # scale already exponentiated), so both comparisons hold.
    img, txt = _normalized(8, 16), _normalized(8, 16)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    ours = siglip_loss(img, txt, scale, bias)
    torch.testing.assert_close(ours, _siglip_reference(img, txt, 10.0, -3.0), atol=1e-5, rtol=1e-5)
    theirs = SigLipLoss()(img, txt, scale, bias)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_gather_is_identity_without_process_group() -> None:
    x = torch.randn(3, 4)
    assert rank_and_world() == (0, 1)
    assert gather_features(x) is x
    assert gather_features(x, with_grad=False) is x


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_caption_loss_ignores_padding(label_smoothing: float) -> None:
    b, t, v = 3, 5, 7
    logits = torch.randn(b, t, v)
    labels = torch.randint(0, v, (b, t))
    labels[0, 3:] = -100
    labels[2, 1:] = -100
    logp = logits.log_softmax(-1)
    terms = []
    for i in range(b):
        for j in range(t):
            y = int(labels[i, j])
            if y == -100:
                continue
            nll = -float(logp[i, j, y])
            smooth = -float(logp[i, j].mean())
            terms.append((1 - label_smoothing) * nll + label_smoothing * smooth)
    expected = torch.tensor(sum(terms) / len(terms))
    got = caption_loss(logits, labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_caption_loss_custom_ignore_index() -> None:
    logits, labels = torch.randn(2, 4, 6), torch.randint(1, 6, (2, 4))
    labels[:, 2:] = 0
    expected = F.cross_entropy(logits[:, :2].reshape(-1, 6), labels[:, :2].reshape(-1))
    torch.testing.assert_close(caption_loss(logits, labels, ignore_index=0), expected)


def test_vqa_loss_is_batch_mean_of_answer_sum() -> None:
    b, a = 4, 9
    logits, targets = torch.randn(b, a), torch.rand(b, a)
    total = 0.0
    for i in range(b):
        for k in range(a):
            p = 1.0 / (1.0 + math.exp(-float(logits[i, k])))
            t = float(targets[i, k])
            total += -(t * math.log(p) + (1 - t) * math.log(1 - p))
    torch.testing.assert_close(
        vqa_loss(logits, targets), torch.tensor(total / b), atol=1e-5, rtol=1e-5
    )


def test_itm_loss_is_cross_entropy() -> None:
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    expected = -sum(
        float(logits[i, labels[i]]) - math.log(math.exp(logits[i, 0]) + math.exp(logits[i, 1]))
        for i in range(6)
    )
    torch.testing.assert_close(
        itm_loss(logits, labels), torch.tensor(expected / 6), atol=1e-6, rtol=1e-6
    )


def test_hard_negatives_never_match() -> None:
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6) * 5 + torch.eye(6) * 20  # the diagonal dominates, still excluded
    for _ in range(200):
        neg_text, neg_image = hard_negatives(sim, generator=gen)
        assert neg_text.shape == neg_image.shape == (6,)
        assert (neg_text != torch.arange(6)).all()
        assert (neg_image != torch.arange(6)).all()


def test_hard_negatives_follow_softmax() -> None:
    sim = torch.tensor([[5.0, 1.0, 0.0], [0.5, 5.0, -1.0], [2.0, 0.3, 5.0]])  # asymmetric
    exp = sim.exp()
    p_i2t = torch.zeros(3, 3)  # image i -> text j
    p_t2i = torch.zeros(3, 3)  # text j -> image i
    for i in range(3):
        for j in range(3):
            if i != j:
                p_i2t[i, j] = exp[i, j] / sum(exp[i, k] for k in range(3) if k != i)
                p_t2i[j, i] = exp[i, j] / sum(exp[k, j] for k in range(3) if k != j)
    gen = torch.Generator().manual_seed(0)
    draws = 6000
    count_i2t, count_t2i = torch.zeros(3, 3), torch.zeros(3, 3)
    rows = torch.arange(3)
    for _ in range(draws):
        neg_text, neg_image = hard_negatives(sim, generator=gen)
        count_i2t[rows, neg_text] += 1
        count_t2i[rows, neg_image] += 1
    # std of a frequency <= sqrt(0.25 / 6000) ~ 0.0065; 0.025 is ~4 sigma
    torch.testing.assert_close(count_i2t / draws, p_i2t, atol=0.025, rtol=0)
    torch.testing.assert_close(count_t2i / draws, p_t2i, atol=0.025, rtol=0)


def test_hard_negatives_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        hard_negatives(torch.randn(2, 3))
    with pytest.raises(ValueError, match="B >= 2"):
        hard_negatives(torch.randn(1, 1))


# ---------------------------------------------------------------- DDP: 2 gloo ranks vs 1 process

WORLD, N, D_IN, D = 2, 8, 12, 6  # global batch N, B = N / WORLD per rank


class _Toy(nn.Module):
    """Linear towers + learnable log temperature and bias, so gradients reach every parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-2.0))


def _setup() -> tuple[_Toy, Tensor, Tensor]:
    """Identical model and global inputs on every process."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return _Toy(), torch.randn(N, D_IN), torch.randn(N, D_IN)


LossFn = Callable[[Tensor, Tensor, _Toy], Tensor]
VARIANTS: dict[str, LossFn] = {
    "clip_global": lambda i, t, m: clip_loss(i, t, m.log_scale.exp()),
    "clip_local": lambda i, t, m: clip_loss(i, t, m.log_scale.exp(), local_loss=True),
    "siglip": lambda i, t, m: siglip_loss(i, t, m.log_scale.exp(), m.bias),
}
# gather without grad: only the loss value is comparable (gradients miss other ranks' terms)
NO_GRAD_VARIANTS: dict[str, LossFn] = {
    "clip_global_nograd": lambda i, t, m: clip_loss(
        i, t, m.log_scale.exp(), gather_with_grad=False
    ),
    "clip_local_nograd": lambda i, t, m: clip_loss(
        i, t, m.log_scale.exp(), local_loss=True, gather_with_grad=False
    ),
}


def _open_clip_variants(rank: int) -> dict[str, LossFn]:
    """open_clip's losses with the same flags, for a per-rank comparison."""
    kw = dict(rank=rank, world_size=WORLD)
    glob = ClipLoss(gather_with_grad=True, **kw)
    loc = ClipLoss(local_loss=True, gather_with_grad=True, **kw)
    sig = SigLipLoss(dist_impl="gather", **kw)
    return {
        "clip_global": lambda i, t, m: glob(i, t, m.log_scale.exp()),
        "clip_local": lambda i, t, m: loc(i, t, m.log_scale.exp()),
        "siglip": lambda i, t, m: sig(i, t, m.log_scale.exp(), m.bias),
    }


def _loss_and_grads(fn: LossFn, model: _Toy, x_img: Tensor, x_txt: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    img = F.normalize(model.img(x_img), dim=-1)
    txt = F.normalize(model.txt(x_txt), dim=-1)
    loss = fn(img, txt, model)
    loss.backward()
    out = {"loss": loss.detach()}
    for n, p in model.named_parameters():  # the bias gets no gradient from clip_loss
        out[f"grad.{n}"] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model, x_img, x_txt = _setup()
        b = N // WORLD
        local = slice(rank * b, (rank + 1) * b)
        results: dict[str, Tensor] = {}
        for tag, fns in [
            ("ours", {**VARIANTS, **NO_GRAD_VARIANTS}),
            ("open_clip", _open_clip_variants(rank)),
        ]:
            for name, fn in fns.items():
                for key, value in _loss_and_grads(fn, model, x_img[local], x_txt[local]).items():
                    results[f"{tag}/{name}/{key}"] = value
        # raw gather: rank r holds rows filled with r; weight each gathered row differently
        x = torch.full((2, 3), float(rank), requires_grad=True)
        w = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3)
        for with_grad in (True, False):
            x.grad = None
            y = gather_features(x, with_grad=with_grad)
            (y * w).sum().backward()
            results[f"gather/{with_grad}/value"] = y.detach()
            results[f"gather/{with_grad}/grad"] = x.grad.clone()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Tensor]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(fn: LossFn) -> dict[str, Tensor]:
    model, x_img, x_txt = _setup()
    return _loss_and_grads(fn, model, x_img, x_txt)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ddp_loss_and_grads_match_single_process(
    ddp_results: list[dict[str, Tensor]], name: str
) -> None:
    expected = _single_process(VARIANTS[name])
    for key, value in expected.items():
        # DDP averages gradients over ranks; the logged loss is the mean over ranks as well
        mean = torch.stack([r[f"ours/{name}/{key}"] for r in ddp_results]).mean(0)
        torch.testing.assert_close(mean, value, atol=1e-5, rtol=1e-5, msg=f"{name} {key}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ddp_matches_open_clip_per_rank(ddp_results: list[dict[str, Tensor]], name: str) -> None:
    for rank, r in enumerate(ddp_results):
        for key in ("loss", "grad.img.weight", "grad.txt.weight", "grad.log_scale"):
            torch.testing.assert_close(
                r[f"ours/{name}/{key}"],
                r[f"open_clip/{name}/{key}"],
                atol=1e-6,
                rtol=1e-5,
                msg=f"rank {rank} {name} {key}",
            )


@pytest.mark.parametrize("name", list(NO_GRAD_VARIANTS))
def test_ddp_gather_without_grad_keeps_loss(
    ddp_results: list[dict[str, Tensor]], name: str
) -> None:
    expected = _single_process(NO_GRAD_VARIANTS[name])["loss"]
    mean = torch.stack([r[f"ours/{name}/loss"] for r in ddp_results]).mean()
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)


def test_ddp_gather_features(ddp_results: list[dict[str, Tensor]]) -> None:
    w = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3)
    gathered = torch.arange(WORLD).repeat_interleave(2)[:, None].expand(-1, 3).float()
    for rank, r in enumerate(ddp_results):
        own = w[2 * rank : 2 * rank + 2]
        for with_grad in (True, False):
            torch.testing.assert_close(r[f"gather/{with_grad}/value"], gathered)
        # with grad: every rank's gradient of this slice is summed back to its owner
        torch.testing.assert_close(r["gather/True/grad"], WORLD * own)
        # without grad: only the local copy carries a gradient
        torch.testing.assert_close(r["gather/False/grad"], own)

"""`multimodal retrieval --rerank-itm K`: each query's top K re-ordered by a TRAINED ITM head
(a tiny CLIP + ITMHead fitted a few dozen steps on the demo digits), the before/after recalls
in metrics.json equal a brute-force recomputation from the head's scores; with an oracle scorer
every query whose true item is in its top K reaches rank 1; a model without an ITM head gets
one error line."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.cli import LightningCLI
from PIL import Image

from multimodal.data.shards import write_shards
from multimodal.eval.commands import retrieval_main
from multimodal.eval.itm_rerank import rerank_with_scores
from multimodal.eval.loading import load_model
from multimodal.eval.retrieval import retrieval_metrics
from tests.export.conftest import tiny_digits_config

K = 5
N_QUERIES = 48  # images (one unique caption each) of the retrieval shard


def _images(shard_dir, limit: int) -> list[tuple[str, bytes, str]]:
    """(key, png bytes, caption) of the first `limit` samples of a demo split."""
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar}
            for name in sorted(members):
                if name.endswith(".txt"):
                    stem = name[: -len(".txt")]
                    png = tar.extractfile(members[stem + ".png"]).read()
                    caption = tar.extractfile(members[name]).read().decode()
                    out.append((stem, png, caption))
                if len(out) == limit:
                    return out
    return out


@pytest.fixture(scope="module")
def itm_run(demo_shards, tmp_path_factory):
    """A tiny digits CLIP with an ITM head fitted 40 steps in-process (config saved with the
    run, as `multimodal fit` does), and a shard of 48 test images whose captions are unique
    (the demo caption and the image's number in the split), so no two texts tie."""
    root = tmp_path_factory.mktemp("itm_run")
    config = tiny_digits_config()
    init = config["model"]["init_args"]
    init["itm_head"] = {
        "class_path": "multimodal.models.ITMHead",
        "init_args": {
            "image_dim": 32,
            "text_dim": 32,
            "config": {"dim": 32, "n_heads": 2, "n_layers": 1},
        },
    }
    init["optim"]["warmup_steps"] = 5
    init["optim"]["lr"] = 0.002
    config_file = root / "fit.yaml"
    config_file.write_text(yaml.safe_dump(config))
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightningCLI(
            run=False,
            args=[
                "--config", str(config_file),
                "--data.init_args.train_urls", str(demo_shards / "train"),
                "--data.init_args.val_urls", str(demo_shards / "val"),
                "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "32",
                "--trainer.max_steps", "40", "--trainer.limit_val_batches", "0",
                "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
                "--trainer.default_root_dir", str(root),
            ],
            save_config_kwargs={"overwrite": True},
        )  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    checkpoint = next(root.rglob("*.ckpt"))
    samples = (
        {"__key__": key, "png": png, "txt": f"{caption} {i}", "json": {}}
        for i, (key, png, caption) in enumerate(_images(demo_shards / "test", N_QUERIES))
    )
    write_shards(samples, root / "shards", prefix="rr", progress=False)
    return {"checkpoint": checkpoint, "config": root / "config.yaml", "data": root / "shards"}


def _args(run, out, *extra: str) -> list[str]:
    return [
        "--checkpoint", str(run["checkpoint"]), "--config", str(run["config"]),
        "--data", str(run["data"]), "--out", str(out), "--num-workers", "0",
        "--no-progress", "--device", "cpu", "--captions", "txt", "--batch-size", "16", *extra,
    ]  # fmt: skip


def _shard_samples(folder) -> tuple[list[torch.Tensor], list[str]]:
    images, texts = [], []
    for shard in sorted(folder.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar}
            for name in sorted(members):
                if name.endswith(".txt"):
                    stem = name[: -len(".txt")]
                    png = tar.extractfile(members[stem + ".png"]).read()
                    images.append(Image.open(io.BytesIO(png)).convert("RGB"))
                    texts.append(tar.extractfile(members[name]).read().decode())
    return images, texts


def _brute_force_ranks(before: torch.Tensor, own: torch.Tensor, itm: torch.Tensor, sim):
    """Ranks after re-ranking: a query of rank <= K gets 1 + the wrong items of its top K by
    `sim` (Q, G) whose ITM score `itm` (Q, G) is >= its true item's; `own` (Q,) true items."""
    after = before.clone()
    for q in range(len(before)):
        if before[q] <= K:
            top = sim[q].topk(K).indices
            assert own[q] in top
            wrong = top[top != own[q]]
            after[q] = 1 + int((itm[q, wrong] >= itm[q, own[q]]).sum())
    return after


def test_itm_rerank_reorders_by_the_trained_head_and_reports_both(itm_run, tmp_path):
    out = tmp_path / "report"
    assert retrieval_main(_args(itm_run, out, "--rerank-itm", str(K))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["retrieval"], metrics["retrieval_itm"]
    assert after["k"] == K
    html = (out / "report.html").read_text()
    assert f"ITM re-ranking of the top {K}" in html and "embeddings" in html

    # brute force: every (image, text) pair scored by the head, in one batch, from the towers
    loaded = load_model(itm_run["checkpoint"], config=itm_run["config"])
    model, head = loaded.model, loaded.itm_head
    images, texts = _shard_samples(itm_run["data"])
    n = len(images)
    assert n == N_QUERIES and len(set(texts)) == n
    with torch.no_grad():
        pixels = torch.stack([loaded.transform(image) for image in images])
        tokens = loaded.tokenizer.batch_encode(texts, max_length=loaded.context_length)
        image_out = model.image_tower(pixels)
        text_out = model.text_tower(tokens.input_ids, tokens.attention_mask)
        image_emb = F.normalize(model.image_projection(image_out.pooled), dim=-1)
        text_emb = F.normalize(model.text_projection(text_out.pooled), dim=-1)
        itm = torch.empty(n, n)  # (image, text)
        for i in range(n):
            itm[i] = head.match_score(
                image_out.tokens[i : i + 1].expand(n, -1, -1),
                text_out.tokens,
                tokens.attention_mask,
            )
    sim = image_emb @ text_emb.T  # (image, text); text j is image j's caption
    own = torch.arange(n)
    correct = sim.diagonal()[:, None]
    i2t = 1 + (torch.ge(sim, correct).sum(1) - 1)  # ties count against the model
    t2i = 1 + (torch.ge(sim.T, correct).sum(1) - 1)
    for k in (1, 5, 10):
        assert before[f"image_to_text/recall@{k}"] == pytest.approx((i2t <= k).double().mean())
        assert before[f"text_to_image/recall@{k}"] == pytest.approx((t2i <= k).double().mean())
    i2t_after = _brute_force_ranks(i2t, own, itm, sim)
    t2i_after = _brute_force_ranks(t2i, own, itm.T, sim.T)
    # the trained head changes the ranking: some query in its top K moves
    assert not torch.equal(i2t_after, i2t) or not torch.equal(t2i_after, t2i)
    for k in (1, 5, 10):
        assert after[f"image_to_text/recall@{k}"] == pytest.approx((i2t_after <= k).double().mean())
        assert after[f"text_to_image/recall@{k}"] == pytest.approx((t2i_after <= k).double().mean())
    assert after["image_to_text/mean_rank"] == pytest.approx(i2t_after.double().mean())
    assert after["text_to_image/mean_rank"] == pytest.approx(t2i_after.double().mean())
    # beyond K nothing moves
    assert after["text_to_image/recall@10"] == before["text_to_image/recall@10"]
    print(
        "ITM re-ranking of the top 5:",
        {m: (before[m], after[m]) for m in before if "recall@1" in m and "recall@10" not in m},
    )


def test_a_model_without_an_itm_head_gets_one_error_line(itm_run, tmp_path, capsys):
    with mock.patch("multimodal.eval.commands.load_model") as load:
        loaded = load_model(itm_run["checkpoint"], config=itm_run["config"])
        loaded.itm_head = None
        load.return_value = loaded
        status = retrieval_main(_args(itm_run, tmp_path / "no_itm", "--rerank-itm", "3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and "needs a model with an image-text matching head" in err[0], err
    assert not (tmp_path / "no_itm" / "metrics.json").exists()


def test_oracle_scores_reach_rank_one_within_top_k_with_several_captions_an_image():
    """`rerank_with_scores` (the path of --rerank-itm) asks its scorer ONCE for every pair, and
    an oracle moves each query whose true item is in its top K to rank 1, in both directions,
    with several captions an image (retrieval_metrics' own oracle test has the single pass)."""
    n_images, n_texts, dim = 25, 70, 4
    images = F.normalize(torch.randn(n_images, dim, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n_texts, dim, dtype=torch.float64), dim=-1)
    text_image = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (45,))])
    before = retrieval_metrics(images, texts, text_image)
    calls = []

    def oracle(image_index, text_index):
        calls.append(len(image_index))
        assert len(set((image_index * n_texts + text_index).tolist())) == len(image_index)
        return (text_image[text_index] == image_index).double()

    after = rerank_with_scores(images, texts, text_image, oracle, k=K, ks=(1, 5, 10))
    assert len(calls) == 1
    for old, new in (
        (before.image_to_text, after.image_to_text),
        (before.text_to_image, after.text_to_image),
    ):
        assert any(1 < r <= K for r in old.ranks) and any(r > K for r in old.ranks)
        expected = torch.where(old.ranks <= K, 1, old.ranks)
        assert torch.equal(new.ranks, expected)
        assert new.recall[1] == pytest.approx((old.ranks <= K).double().mean().item())
        assert new.recall[10] == old.recall[10]

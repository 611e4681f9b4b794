"""`multimodal zeroshot` and `multimodal retrieval` end to end on a checkpoint trained here:
the loaded weights are the trained ones, the reported accuracy is the one computed by hand,
the reports embed images, and bad input gets errors that name the file."""

from __future__ import annotations

import json
import math
import sys
import uuid
from unittest import mock

import open_clip
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI

from multimodal.cli import COMMANDS
from multimodal.data.demo import HELD_OUT_TEMPLATES, render_captions, write_demo_shards
from multimodal.eval.commands import retrieval_main, zeroshot_main
from multimodal.eval.evaluate import eval_loader
from multimodal.eval.loading import load_model
from multimodal.tasks.optim import OptimConfig
from tests.helpers import CONFIGS

TINY_TOWERS = (
    "--model.init_args.model.init_args.embed_dim", "32",
    "--model.init_args.model.init_args.image_tower.init_args.config.dim", "32",
    "--model.init_args.model.init_args.image_tower.init_args.config.n_heads", "2",
    "--model.init_args.model.init_args.image_tower.init_args.config.n_layers", "1",
    "--model.init_args.model.init_args.text_tower.init_args.config.transformer.dim", "32",
    "--model.init_args.model.init_args.text_tower.init_args.config.transformer.n_heads", "2",
    "--model.init_args.model.init_args.text_tower.init_args.config.transformer.n_layers", "1",
)  # fmt: skip
N_TEST = 270  # the test split of the demo digits
CAPTIONS_PER_IMAGE = 8  # 6 training templates + 2 held-out ones


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Demo shards and a tiny CLIP of configs/clip/digits.yaml fitted 2 steps in-process (as
    `multimodal fit` does: the config is saved next to the logs, the checkpoint below)."""
    root = tmp_path_factory.mktemp("run")
    write_demo_shards(root / "digits", progress=False)
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # pytest's arguments are not ours
        cli = LightningCLI(
            run=False,
            args=[
                "--config", str(CONFIGS / "clip/digits.yaml"), *TINY_TOWERS,
                "--data.init_args.train_urls", str(root / "digits/train"),
                "--data.init_args.val_urls", str(root / "digits/val"),
                "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "32",
                "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                "--trainer.precision", "32", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false",
                "--trainer.default_root_dir", str(root),
            ],
            save_config_kwargs={"overwrite": True},
        )  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    checkpoint = next(root.rglob("*.ckpt"))
    state = {k: v.clone() for k, v in cli.model.state_dict().items()}
    return {"root": root, "checkpoint": checkpoint, "state": state, "test": root / "digits/test"}


def common(run, out) -> list[str]:
    return ["--data", str(run["test"]), "--out", str(out), "--num-workers", "0", "--no-progress"]


def read_metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_report(out, min_images: int) -> str:
    for name in ("metrics.json", "summary.md", "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= min_images
    return html


def test_commands_are_registered():
    assert {"zeroshot", "retrieval", "demo"} <= set(COMMANDS)


def test_checkpoint_loads_the_trained_weights_with_the_run_config(run):
    loaded = load_model(run["checkpoint"])  # config.yaml found next to the logs
    assert "config.yaml" in loaded.description
    trained = {k.removeprefix("model."): v for k, v in run["state"].items()}
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert loaded.context_length == 16
    assert not loaded.model.training


def test_zeroshot_reports_the_accuracy_computed_by_hand(run, tmp_path, capsys):
    out = tmp_path / "zeroshot"
    args = ["--checkpoint", str(run["checkpoint"]), "--classes", "digits", "--examples", "6"]
    assert zeroshot_main([*args, *common(run, out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    metrics = read_metrics(out)["zeroshot"]
    html = assert_report(out, min_images=6 + 2)  # examples + per-class and confusion plots
    assert "Zero-shot: confusion matrix" in html and "Zero-shot: examples" in html

    # by hand: mean of the normalised prompt embeddings of each class, cosine, argmax
    loaded = load_model(run["checkpoint"])
    model, tokenizer = loaded.model, loaded.tokenizer
    correct = total = 0
    with torch.no_grad():
        classifier = []
        for label in range(10):
            tokens = tokenizer.batch_encode(
                render_captions(label, HELD_OUT_TEMPLATES), max_length=16
            )
            text = model.encode_text(tokens.input_ids, tokens.attention_mask)
            classifier.append(F.normalize(text.mean(0), dim=0))
        classifier = torch.stack(classifier)
        for batch in eval_loader(str(run["test"]), loaded, num_workers=0):
            predicted = (model.encode_image(batch["images"]) @ classifier.T).argmax(1)
            correct += (predicted == batch["labels"]).sum().item()
            total += len(predicted)
    assert total == metrics["n_samples"] == N_TEST
    assert metrics["top1"] == pytest.approx(correct / total, abs=1e-9)
    assert metrics["top1"] <= metrics["top5"] <= 1


def test_retrieval_counts_every_caption_and_writes_the_examples(run, tmp_path):
    out = tmp_path / "retrieval"
    args = ["--checkpoint", str(run["checkpoint"]), "--examples", "3"]
    assert retrieval_main([*args, *common(run, out), "--max-memory-mib", "1"]) == 0
    metrics = read_metrics(out)["retrieval"]
    assert metrics["n_images"] == N_TEST
    assert metrics["n_texts"] == N_TEST * CAPTIONS_PER_IMAGE
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metrics[f"{direction}/recall@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and recalls[0] >= 0 and recalls[-1] <= 1
        assert metrics[f"{direction}/median_rank"] >= 1
    html = assert_report(out, min_images=3 * 5 + 3)  # text->image results + image queries
    assert "Retrieval: Recall@K" in html and ("✓" in html or "✗" in html)

    # text -> image Recall@10 by brute force over the full similarity matrix (ties pessimistic)
    loaded = load_model(run["checkpoint"])
    images, references = [], []
    with torch.no_grad():
        for batch in eval_loader(str(run["test"]), loaded, num_workers=0):
            references += batch["references"]
            images.append(loaded.model.encode_image(batch["images"]))
        flat = [caption for refs in references for caption in refs]
        tokens = loaded.tokenizer.batch_encode(flat, max_length=16)
        texts = loaded.model.encode_text(tokens.input_ids, tokens.attention_mask)
    counts = [len(refs) for refs in references]
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    scores = texts @ torch.cat(images).T  # (N_t, N_i)
    correct = scores.gather(1, owner[:, None])
    wrong_above = (scores >= correct).sum(1) - 1
    assert metrics["text_to_image/recall@10"] == pytest.approx(
        (wrong_above < 10).double().mean().item(), abs=1.5 / len(owner)
    )


def test_retrieval_with_one_caption_an_image(run, tmp_path):
    out = tmp_path / "txt"
    args = ["--checkpoint", str(run["checkpoint"]), "--captions", "txt", "--examples", "0"]
    assert retrieval_main([*args, *common(run, out)]) == 0
    assert read_metrics(out)["retrieval"]["n_texts"] == N_TEST


def test_python_built_checkpoint_loads_through_the_config_allowlist(run, tmp_path):
    """A task built in Python keeps an OptimConfig in its hyper-parameters: allowed; any
    other object is refused (never weights_only=False)."""
    path = tmp_path / "python.ckpt"
    hyper = {"optim": OptimConfig(lr=1e-3)}
    torch.save({"state_dict": run["state"], "hyper_parameters": hyper}, path)
    config = run["checkpoint"].parents[1] / "config.yaml"
    loaded = load_model(path, config=config)
    torch.testing.assert_close(
        loaded.model.logit_scale, run["state"]["model.logit_scale"], rtol=0, atol=0
    )
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": run["state"], "hyper_parameters": {"x": uuid.uuid4()}}, evil)
    with pytest.raises(ValueError, match="evil.ckpt.*not loaded"):
        load_model(evil, config=config)


def test_errors_name_the_file(run, tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    base = ["--classes", "digits", *common(run, tmp_path / "x")]
    assert zeroshot_main(["--checkpoint", str(missing), *base]) == 2
    assert "missing.ckpt" in capsys.readouterr().err

    lonely = tmp_path / "lonely.ckpt"  # a checkpoint away from its run folder
    lonely.write_bytes(run["checkpoint"].read_bytes())
    assert zeroshot_main(["--checkpoint", str(lonely), *base]) == 2
    assert "pass --config" in capsys.readouterr().err

    full_size = str(CONFIGS / "clip/digits.yaml")  # 128-wide towers: not the tiny run's
    assert zeroshot_main(["--checkpoint", str(lonely), "--config", full_size, *base]) == 2
    err = capsys.readouterr().err
    assert "lonely.ckpt" in err and "does not fit" in err

    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(SystemExit):
        zeroshot_main(["--checkpoint", str(lonely), "--classes", str(names), *base[2:]])
    assert "--templates" in capsys.readouterr().err


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def test_zeroshot_of_an_open_clip_model_from_a_local_checkpoint(run, tmp_path):
    name = f"test-eval-clip-{uuid.uuid4().hex[:8]}"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    source = open_clip.create_model(name)
    with torch.no_grad():
        source.logit_scale.fill_(math.log(10.0))
    weights = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "open_clip"
    args = ["--open-clip", name, "--checkpoint", str(weights), "--classes", "digits"]
    assert zeroshot_main([*args, *common(run, out), "--examples", "2"]) == 0
    metrics = read_metrics(out)["zeroshot"]
    assert metrics["n_samples"] == N_TEST and 0 <= metrics["top1"] <= metrics["top5"] <= 1
    assert name in (out / "summary.md").read_text()
    assert_report(out, min_images=2)

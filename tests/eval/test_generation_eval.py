"""`multimodal caption-eval` and `multimodal vqa-eval` on tiny randomly initialised checkpoints
(configs/caption/digits.yaml and configs/vqa/digits.yaml with 1-layer, 32-wide towers).

The evaluation shards are written in two steps so that the metrics are not all 0: the model's
own captions / answers on the images are computed first (directly, through the datamodule and
the model), then the references and annotators' answers are made to share some of them. The
commands must then reproduce what `trainer.validate` logs on the same checkpoint and shards.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from multimodal.data.answers import normalize_answer
from multimodal.data.demo import VQA_QUESTIONS
from multimodal.data.digits import DIGIT_NAMES, load_digit_images
from multimodal.data.shards import encode_png, write_shards
from multimodal.eval.caption_eval import caption_eval_main
from multimodal.eval.caption_metrics import bleu
from multimodal.eval.generation_eval import best_and_worst
from multimodal.eval.loading import instantiate_model_and_data
from multimodal.eval.vqa_eval import answer_type, question_type, vqa_eval_main
from multimodal.tasks.captioning import cut_at
from tests.helpers import CONFIGS, quiet_trainer, save_task

TINY = {"dim": 32, "n_heads": 2, "n_layers": 1}
CAPTION_IMAGES = 24
VQA_IMAGES = 12
BATCH = 8
ANSWERS = [str(n) for n in range(11)] + ["yes", "no", "red", "blue"]
# the official question types of the demo questions, by hand from mscoco_question_types.txt
DEMO_QUESTION_TYPES = {
    "what digit is this?": "what",
    "is it even?": "is it",
    "is it greater than five?": "is it",
    "is it less than three?": "is it",
    "what is this number plus one?": "what is this",
}


def _write(root: Path, samples: list[dict]) -> Path:
    """Samples without a split as one shard series in `root`."""
    write_shards(samples, root, prefix="eval", progress=False)
    return root


def _images(n: int) -> list[tuple[bytes, int]]:
    images, labels = load_digit_images(32)
    return [(encode_png(Image.fromarray(images[i])), int(labels[i])) for i in range(n)]


def _config(name: str, tokenizer: Path, urls: Path, data: dict | None = None) -> dict:
    """configs/<name> with 1-layer 32-wide towers, reading `urls`, batches of BATCH, no
    workers."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    config.pop("trainer")
    init = config["model"]["init_args"]["model"]["init_args"]
    init["image_tower"]["init_args"]["config"].update(TINY)
    for tower in ("decoder", "text_tower"):
        if tower in init:
            init[tower]["init_args"]["config"]["transformer"].update(TINY)
    if "fusion" in init:
        init["fusion"].update(TINY)
    config["data"]["init_args"].update(
        train_urls=str(urls),
        val_urls=str(urls),
        tokenizer=str(tokenizer),
        batch_size=BATCH,
        num_workers=0,
        **(data or {}),
    )
    return config


def _save(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _validate(config: Path, checkpoint: Path) -> dict[str, float]:
    """What `trainer.validate` logs for the checkpoint on the config's val shards."""
    task, data = instantiate_model_and_data(config, checkpoint)
    (logged,) = quiet_trainer(precision="32-true").validate(task, datamodule=data)
    return logged


def _run(main, checkpoint: Path, config: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "--checkpoint", str(checkpoint), "--config", str(config), "--data", str(data),
            "--out", str(out), "--batch-size", str(BATCH), "--num-workers", "0",
            "--device", "cpu", "--no-progress", *extra,
        ]
    )  # fmt: skip


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- captioning


@pytest.fixture(scope="module")
def caption_run(demo_shards, tmp_path_factory):
    """(checkpoint, config, evaluation shards, the model's caption of each key) of a tiny
    captioner, the shards' references sharing some of those captions."""
    root = tmp_path_factory.mktemp("caption_eval")
    images = _images(CAPTION_IMAGES)
    probe = _write(
        root / "probe",
        [
            {"__key__": f"img-{i:03d}", "png": png, "txt": f"the digit {DIGIT_NAMES[label]}"}
            for i, (png, label) in enumerate(images)
        ],
    )
    config = _save(
        _config("caption/digits.yaml", demo_shards / "tokenizer", probe), root / "probe.yaml"
    )
    torch.manual_seed(0)
    task, data = instantiate_model_and_data(config)
    checkpoint = save_task(task, root / "caption.ckpt")
    captions = {}
    task.eval()
    eos = task.model.decoder.config.eos_id
    with torch.no_grad():
        for batch in data.val_dataloader():
            sequences = task.model.generate(batch["images"]).sequences
            for key, row in zip(batch["keys"], sequences, strict=True):
                captions[key] = data.tokenizer.decode(cut_at(row, eos))
    samples = []
    for i, (png, label) in enumerate(images):
        key = f"img-{i:03d}"
        words = captions[key].split()
        name = DIGIT_NAMES[label]
        references = [
            [captions[key], f"a photo of the number {name}"],  # an exact match
            [" ".join(words[:-2] + ["the", "digit", name]), f"a handwritten {label}"],
            [" ".join(words[:3] + ["scan"]), f"the digit {name}"],
            [f"a photo of the number {name}", f"the digit {name}"],
        ][i % 4]
        samples.append(
            {"__key__": key, "png": png, "txt": references[0], "json": {"captions": references}}
        )
    shards = _write(root / "eval", samples)
    eval_config = _save(
        _config("caption/digits.yaml", demo_shards / "tokenizer", shards), root / "eval.yaml"
    )
    return checkpoint, eval_config, shards, captions


def test_caption_eval_reproduces_validation(caption_run, tmp_path):
    checkpoint, config, shards, captions = caption_run
    out = tmp_path / "report"
    assert _run(caption_eval_main, checkpoint, config, shards, out, "--examples", "3") == 0

    logged = _validate(config, checkpoint)
    metrics = json.loads((out / "metrics.json").read_text())
    caption = metrics["caption"]
    for name in ("bleu_4", "rouge_l", "cider_d", "exact_match"):
        assert caption[name] == pytest.approx(float(logged[f"val/{name}"]), abs=1e-6), name
    # the shards were written so that these are neither 0 nor perfect
    assert 0 < caption["bleu_4"] < 1 and caption["cider_d"] > 0
    assert caption["exact_match"] == pytest.approx(0.25)  # one image in four
    assert caption["images"] == CAPTION_IMAGES

    rows = _predictions(out)
    # BLEU-1..4 are corpus BLEU over every image's generated caption and all its references
    # (BLEU-n need not fall with n: corpus p_2 can exceed p_1 under per-reference clipping)
    expected = bleu([r["generated"] for r in rows], [r["references"] for r in rows])
    for n in range(1, 5):
        assert caption[f"bleu_{n}"] == pytest.approx(expected[f"bleu_{n}"], abs=1e-9)
    assert [r["key"] for r in rows] == sorted(captions)  # every image once, in order
    assert {r["key"]: r["generated"] for r in rows} == captions
    per_image = [r["cider_d"] for r in rows]
    assert sum(per_image) / len(per_image) == pytest.approx(caption["cider_d"], abs=1e-9)

    meta = metrics["meta"]
    assert meta["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta["data"] == str(shards)
    assert meta["generation"].startswith("greedy, max_new_tokens=15")
    assert "torch " in meta["packages"] and meta["date"]

    html = (out / "report.html").read_text()
    best, worst = best_and_worst(per_image, 3)
    assert "Best captions by CIDEr-D" in html and "Worst captions by CIDEr-D" in html
    assert html.count("<img") >= 6  # each example's image
    for i in (*best, *worst):
        assert rows[i]["key"] in html
    assert min(per_image[i] for i in best) >= max(per_image[i] for i in worst)
    assert "CIDEr-D: tf-idf" in html  # the definitions
    summary = (out / "summary.md").read_text()
    assert "caption/cider_d" in summary


def test_caption_eval_overrides_generation(caption_run, tmp_path):
    """--max-new-tokens cuts the captions to that many tokens."""
    checkpoint, config, shards, captions = caption_run
    out = tmp_path / "short"
    assert _run(caption_eval_main, checkpoint, config, shards, out, "--max-new-tokens", "2") == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["generation"] == "greedy, max_new_tokens=2"
    for row in _predictions(out):
        full = captions[row["key"]]
        assert len(row["generated"].split()) <= 2 and full.startswith(row["generated"])
    # no caption has 3 tokens: BLEU-3 and BLEU-4 are 0 by construction, and the report says so
    assert json.loads((out / "metrics.json").read_text())["caption"]["bleu_4"] == 0.0
    rows = {
        line.split("|")[1].strip(): line
        for line in (out / "summary.md").read_text().splitlines()
        if line.startswith("| caption/")
    }
    for n in (3, 4):
        assert "⚠ 0 by construction" in rows[f"caption/bleu_{n}"], rows
    assert "⚠" not in rows["caption/rouge_l"]


# --------------------------------------------------------------------------- VQA


@pytest.fixture(scope="module")
def vqa_run(demo_shards, tmp_path_factory):
    """(checkpoint, config, evaluation shards, the model's answer to each question key, the
    shards' pairs by key) of a tiny VQA model; the annotators gave its answer 0-3 times."""
    root = tmp_path_factory.mktemp("vqa_eval")
    images = _images(VQA_IMAGES)

    def sample(i: int, png: bytes, pairs: list[dict]) -> dict:
        return {"__key__": f"img-{i:03d}", "png": png, "txt": "x", "json": {"vqa": pairs}}

    placeholder = [{"question": q, "answers": ["yes"] * 3} for q in VQA_QUESTIONS]
    probe = _write(
        root / "probe", [sample(i, png, placeholder) for i, (png, _) in enumerate(images)]
    )
    data_args = {"answer_vocab": ANSWERS}
    config = _config("vqa/digits.yaml", demo_shards / "tokenizer", probe, data_args)
    config["model"]["init_args"]["model"]["init_args"]["num_answers"] = len(ANSWERS)
    _save(config, root / "probe.yaml")
    torch.manual_seed(0)
    task, data = instantiate_model_and_data(root / "probe.yaml")
    with torch.no_grad():  # larger head weights: answers that differ between questions
        for parameter in task.model.classifier.parameters():
            parameter.normal_(std=1.0)
    checkpoint = save_task(task, root / "vqa.ckpt")
    predicted = {}
    task.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = task.model(batch["images"], batch["input_ids"], batch["attention_mask"]).logits
            for key, index in zip(batch["keys"], logits.argmax(-1).tolist(), strict=True):
                predicted[key] = ANSWERS[index]
    samples, pairs_by_key = [], {}
    for i, (png, _) in enumerate(images):
        pairs = []
        for n, question in enumerate(VQA_QUESTIONS):
            answer = predicted[f"img-{i:03d}/{n}"]
            fillers = [f for f in ("blue", "7", "no", "red") if f != answer]
            k = (i + n) % 4  # annotators giving the model's answer
            pair = {"question": question, "answers": [answer] * k + fillers[: 3 - k]}
            if i % 2 == 0:  # the data's own types on half the images
                pair["question_type"] = f"given {n % 2}"
                pair["answer_type"] = ("yes/no", "number", "other")[i % 3]
            pairs.append(pair)
            pairs_by_key[f"img-{i:03d}/{n}"] = pair
        samples.append(sample(i, png, pairs))
    shards = _write(root / "eval", samples)
    eval_config = _config("vqa/digits.yaml", demo_shards / "tokenizer", shards, data_args)
    eval_config["model"]["init_args"]["model"]["init_args"]["num_answers"] = len(ANSWERS)
    return checkpoint, _save(eval_config, root / "eval.yaml"), shards, predicted, pairs_by_key


def _brute_force_types(predicted: dict, pairs: dict) -> tuple[dict, dict]:
    """Accuracy by question type and by answer type, counted naively (the answers written are
    already in normal form)."""
    kinds = {"yes": "yes/no", "no": "yes/no", "7": "number", "blue": "other", "red": "other"}
    kinds.update({str(n): "number" for n in range(11)})
    by_question, by_answer = defaultdict(list), defaultdict(list)
    for key, pair in pairs.items():
        answers = pair["answers"]
        score = min(sum(a == predicted[key] for a in answers) / 3, 1.0)
        if "question_type" in pair:
            question, answer = pair["question_type"], pair["answer_type"]
        else:
            question = DEMO_QUESTION_TYPES[pair["question"]]
            votes = [kinds[a] for a in answers]
            answer = max(votes, key=lambda kind: (votes.count(kind), -votes.index(kind)))
        by_question[question].append(score)
        by_answer[answer].append(score)
    mean = lambda groups: {k: sum(v) / len(v) for k, v in groups.items()}  # noqa: E731
    return mean(by_question), mean(by_answer)


def test_vqa_eval_reproduces_validation_and_types(vqa_run, tmp_path):
    checkpoint, config, shards, predicted, pairs = vqa_run
    out = tmp_path / "report"
    assert _run(vqa_eval_main, checkpoint, config, shards, out, "--examples", "6") == 0

    logged = _validate(config, checkpoint)
    vqa = json.loads((out / "metrics.json").read_text())["vqa"]
    assert vqa["accuracy"] == pytest.approx(float(logged["val/acc"]), abs=1e-6)
    assert vqa["accuracy"] == pytest.approx(0.5)  # 0, 1/3, 2/3 and 1 equally often
    assert vqa["questions"] == VQA_IMAGES * len(VQA_QUESTIONS)
    assert vqa["images"] == VQA_IMAGES

    by_question, by_answer = _brute_force_types(predicted, pairs)
    assert vqa["by_question_type"] == pytest.approx(by_question, abs=1e-12)
    assert vqa["by_answer_type"] == pytest.approx(by_answer, abs=1e-12)
    assert {"what", "is it", "what is this", "given 0", "given 1"} == set(by_question)

    rows = _predictions(out)
    assert [r["key"] for r in rows] == list(pairs)  # every question once, in order
    assert {r["key"]: r["predicted"] for r in rows} == predicted

    html = (out / "report.html").read_text()
    assert "Accuracy by question type" in html and "Accuracy by answer type" in html
    assert "<th>question type</th>" in html and "<th>answer type</th>" in html
    examples = html.split("<h2>Examples</h2>")[1]
    assert examples.count("<img") == 6
    assert examples.count('class="bad"') == 3 and examples.count('class="ok"') == 3
    wrong = sorted((r for r in rows if r["score"] < 1), key=lambda r: r["score"])[:3]
    right = [r for r in rows if r["score"] == 1][:3]
    for row in wrong + right:  # the lowest-scored wrong answers, then the first right ones
        assert f"<td>{row['key']}</td>" in examples
    assert len(set(predicted.values())) > 1


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line(caption_run, vqa_run, tmp_path, capsys):
    caption_ckpt, caption_config, caption_shards, _ = caption_run
    vqa_ckpt, vqa_config, _, _, _ = vqa_run
    cases = [
        (caption_eval_main, vqa_ckpt, vqa_config, caption_shards, "Captioning"),
        (vqa_eval_main, caption_ckpt, caption_config, caption_shards, "VisualQuestionAnswering"),
        (caption_eval_main, vqa_ckpt, caption_config, caption_shards, "does not fit"),
        (caption_eval_main, caption_ckpt, caption_config, tmp_path / "none", "none"),
        (caption_eval_main, tmp_path / "no.ckpt", caption_config, caption_shards, "no.ckpt"),
    ]
    for main, checkpoint, config, data, expected in cases:
        assert _run(main, checkpoint, config, data, tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- types, answers


def test_question_and_answer_types():
    assert question_type("How many people are in the room?") == "how many people are in"
    assert question_type("What is the color of the bus?") == "what is the color of the"
    assert question_type("Is this a cat?") == "is this a"
    assert question_type("Name the animal.") == "none of the above"
    assert answer_type(["yes", "Yes", "no"]) == "yes/no"
    assert answer_type(["two", "2", "red"]) == "number"  # "two" normalises to 2
    assert answer_type(["red", "3", "yes"]) == "other"  # a tie of three: the first given


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("whys", "why's"),  # entries of the official table that were missing
        ("whyll", "why'll"),
        ("Whyre?", "why're"),
        ("'ows'at", "'ow's'at"),
        ("ow's'at", "'ow's'at"),
        ("'ow'sat", "'ow's'at"),
    ],
)
def test_added_contractions(answer, expected):
    assert normalize_answer(answer) == expected

"""`multimodal benchmark` (multimodal/eval/benchmark.py): a suite of tiny models x three
datasets (digits shards, an ImageFolder tree, a CSV) gives cell by cell the numbers of the
single commands; a rerun with a new model computes only its cells; an interrupted suite resumes;
results.jsonl holds CLIP_benchmark's records; the leaderboard marks the best model."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from multimodal.data.digits import DIGIT_NAMES, load_digit_images
from multimodal.data.shards import encode_png, write_shards
from multimodal.eval import benchmark, commands, evaluate
from multimodal.eval.benchmark import RESULTS_FILE, ModelSpec, benchmark_main
from multimodal.eval.benchmark_report import leaderboard_tables
from multimodal.eval.benchmark_suite import Suite, SuiteTask, load_suite
from multimodal.eval.commands import retrieval_main, zeroshot_main
from multimodal.eval.loading import instantiate_model_and_data, load_model
from multimodal.eval.report import Marked, Section
from tests.export.conftest import tiny_digits_config
from tests.helpers import save_task

PER_CLASS = 2
BATCH = ["--batch-size", "8", "--num-workers", "0", "--no-progress"]
CELLS_PER_MODEL = 7  # the suite below


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(checkpoint, config) of three randomly initialised tiny digits CLIPs (seeds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("models")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_digits_config()))
    found = []
    for seed in range(3):
        torch.manual_seed(seed)
        task, _ = instantiate_model_and_data(config)
        found.append((str(save_task(task, root / f"m{seed}.ckpt")), str(config)))
    return found


@pytest.fixture(scope="module")
def loads():
    """load_model, each checkpoint built once for the whole module; the calls are recorded."""
    memo, calls = {}, []

    def load(checkpoint, **kwargs):
        calls.append(str(checkpoint))
        if str(checkpoint) not in memo:
            memo[str(checkpoint)] = load_model(checkpoint, **kwargs)
        return memo[str(checkpoint)]

    return load, calls


@pytest.fixture
def patched(monkeypatch, loads):
    """The memoised loader in both the benchmark and the single commands; the commands'
    report plots left out (the metrics are compared; plots are tested in test_report.py)."""
    monkeypatch.setattr(benchmark, "load_model", loads[0])
    monkeypatch.setattr(commands, "load_model", loads[0])
    for name in ("per_class_section", "confusion_section", "recall_curve_section"):
        monkeypatch.setattr(evaluate, name, lambda *args, title="", **kwargs: Section(title))
    loads[1].clear()
    return loads[1]


def captions(label: int) -> list[str]:
    return [f"a photo of the number {DIGIT_NAMES[label]}", f"a handwritten {label}"]


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    """Three datasets of different digit scans: shards (captions and labels), an ImageFolder
    tree (labels from the folders) and a CSV (captions and labels); the suite runs zero-shot on
    each, retrieval on the captioned ones and a linear probe and k-NN on the CSV trained on the
    shards."""
    root = tmp_path_factory.mktemp("suite")
    images, labels = load_digit_images(32)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    pick = [[int(index[j]) for index in by_class] for j in range(3 * PER_CLASS)]
    samples, rows = [], []
    for part in range(PER_CLASS):
        for label, index in enumerate(pick[part]):
            samples.append(
                {
                    "__key__": f"s{part}-{label}",
                    "png": encode_png(Image.fromarray(images[index])),
                    "txt": captions(label)[0],
                    "json": {"label": label, "class_name": DIGIT_NAMES[label],
                             "captions": captions(label)},
                }
            )  # fmt: skip
        for label, index in enumerate(pick[PER_CLASS + part]):
            folder = root / "tree" / DIGIT_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{part}.png")
        for label, index in enumerate(pick[2 * PER_CLASS + part]):
            (root / "csv").mkdir(exist_ok=True)
            Image.fromarray(images[index]).save(root / "csv" / f"{label}-{part}.png")
            for caption in captions(label):
                rows.append(
                    {"image": f"{label}-{part}.png", "label": label,
                     "class_name": DIGIT_NAMES[label], "caption": caption}
                )  # fmt: skip
    write_shards(samples, root / "shards", prefix="digits", max_samples=10, progress=False)
    with open(root / "csv" / "data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label", "class_name", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    shards, tree, table = (
        str(root / "shards"),
        f"imagefolder:{root / 'tree'}",
        (f"csv:{root / 'csv' / 'data.csv'}"),
    )
    suite = {
        "tasks": [
            {"dataset": shards, "name": "shards", "task": "zeroshot"},
            {"dataset": shards, "name": "shards", "task": "retrieval"},
            {"dataset": tree, "name": "tree", "task": "zeroshot"},
            {"dataset": table, "name": "table", "task": "zeroshot", "classes": "digits"},
            {"dataset": table, "name": "table", "task": "retrieval", "captions": "all"},
            {"dataset": table, "name": "table", "task": "linear_probe", "train": shards},
            {"dataset": table, "name": "table", "task": "knn", "train": shards, "k": 3},
        ]
    }
    file = root / "suite.yaml"
    file.write_text(yaml.safe_dump(suite))
    return file, {"shards": shards, "tree": tree, "table": table}


def run_benchmark(models, suite_file, out, *extra: str) -> int:
    checkpoints = [m[0] for m in models]
    configs = [m[1] for m in models]
    return benchmark_main(
        ["--models", *checkpoints, "--configs", *configs, "--tasks", str(suite_file[0]),
         "--out", str(out), *BATCH, *extra]
    )  # fmt: skip


def results(out) -> dict[tuple[str, str, str], dict]:
    """(model label, column, suite task) -> record of results.jsonl."""
    records = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    return {(r["model_label"], r["column"], r["suite_task"]): r for r in records}


def cells_line(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("cells:"))


def single_command(main, checkpoint, config, data, out, *extra) -> dict:
    argv = ["--checkpoint", checkpoint, "--config", config, "--data", data,
            "--out", str(out), "--examples", "0", *BATCH, *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_suite_matches_single_commands_and_reruns_only_new_cells(
    models, suite_file, patched, tmp_path, capsys
):
    out = tmp_path / "bench"
    assert run_benchmark(models[:2], suite_file, out) == 0
    assert cells_line(capsys).startswith(f"cells: {2 * CELLS_PER_MODEL} computed, 0 from")
    found = results(out)
    assert len(found) == 2 * CELLS_PER_MODEL
    data = suite_file[1]
    for (checkpoint, config), label in zip(models[:2], ("m0", "m1"), strict=True):
        for name in ("shards", "tree", "table"):
            extra = ["--classes", "digits", "--templates", "digits"] if name == "table" else []
            if name == "table":
                extra += ["--linear-probe", data["shards"], "--knn", "3"]
            reference = single_command(
                zeroshot_main, checkpoint, config, data[name], tmp_path / f"z-{label}-{name}",
                *extra,
            )  # fmt: skip
            cell = found[(label, name, "zeroshot")]["metrics"]
            assert cell["acc1"] == reference["zeroshot"]["top1"]
            assert cell["acc5"] == reference["zeroshot"]["top5"]
            assert cell["mean_per_class_recall"] == reference["zeroshot"]["mean_per_class_recall"]
            assert cell["n_samples"] == reference["zeroshot"]["n_samples"] == 10 * PER_CLASS
            if name == "table":
                probe = found[(label, name, "linear_probe")]["metrics"]
                assert probe["lp_acc1"] == reference["linear_probe"]["top1"]
                knn = found[(label, name, "knn")]["metrics"]
                assert knn["acc1"] == reference["knn"]["top1"]
            if name == "tree":
                continue
            reference = single_command(
                retrieval_main, checkpoint, config, data[name], tmp_path / f"r-{label}-{name}"
            )["retrieval"]
            cell = found[(label, name, "retrieval")]["metrics"]
            for k in (1, 5, 10):
                assert cell[f"image_retrieval_recall@{k}"] == reference[f"text_to_image/recall@{k}"]
                assert cell[f"text_retrieval_recall@{k}"] == reference[f"image_to_text/recall@{k}"]
            assert cell["n_texts"] == reference["n_texts"] == 2 * 10 * PER_CLASS
    # the models' numbers differ (different seeds), so the comparison above can fail
    assert found[("m0", "shards", "retrieval")] != found[("m1", "shards", "retrieval")]

    patched.clear()
    capsys.readouterr()
    assert run_benchmark(models, suite_file, out) == 0
    line = cells_line(capsys)
    assert line.startswith(
        f"cells: {CELLS_PER_MODEL} computed, {2 * CELLS_PER_MODEL} from {RESULTS_FILE}; "
        "embeddings: 3 computed"
    ), line  # shards (with captions, also the probes' training data), tree, table
    assert set(patched) == {models[2][0]}  # the old models were not even loaded
    rerun = results(out)
    assert len(rerun) == 3 * CELLS_PER_MODEL
    assert all(rerun[key] == record for key, record in found.items())

    summary = (out / "summary.md").read_text()
    assert "Per-class deltas: shards" in summary and "Definitions" in summary
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["models"]["m2"]["checkpoint_sha256"] == benchmark.file_sha256(models[2][0])
    assert "torch" in meta["versions"]
    html = (out / "report.html").read_text()
    assert html.count("<figure>") == 3  # a bar chart a dataset


CLIP_BENCHMARK_METRICS = {
    "zeroshot_classification": {"acc1", "acc5", "mean_per_class_recall"},
    "zeroshot_retrieval": {
        f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)
    },
    "linear_probe": {"lp_acc1", "lp_mean_per_class_recall"},
    "knn": {"acc1", "mean_per_class_recall"},
}


def test_interrupted_suite_resumes_with_the_missing_cells(
    models, suite_file, patched, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "bench"
    real = benchmark.evaluate_cell
    done = []

    def interrupted(*args, **kwargs):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "evaluate_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(models[:2], suite_file, out)
    assert len((out / RESULTS_FILE).read_text().splitlines()) == 3
    monkeypatch.setattr(benchmark, "evaluate_cell", real)
    capsys.readouterr()
    assert run_benchmark(models[:2], suite_file, out) == 0
    line = cells_line(capsys)
    # before the stop the first model embedded the shards (read again now as the probes'
    # training data) and the tree (no cell left to read it)
    assert line.startswith(
        f"cells: {2 * CELLS_PER_MODEL - 3} computed, 3 from {RESULTS_FILE}; embeddings: 4 "
        "computed, 1 from the cache"
    ), line
    records = [json.loads(row) for row in (out / RESULTS_FILE).read_text().splitlines()]
    assert len(records) == 2 * CELLS_PER_MODEL == len({r["cell"] for r in records})
    for record in records:  # CLIP_benchmark's record: these fields, these metric names
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
        assert CLIP_BENCHMARK_METRICS[record["task"]] <= set(record["metrics"])
        assert all(isinstance(v, (int, float)) for v in record["metrics"].values())
        assert record["pretrained"] in {models[0][0], models[1][0]}


def test_leaderboard_marks_the_best_model_of_each_column():
    suite = Suite(
        [
            SuiteTask(dataset="shards:a", name="a", task="zeroshot"),
            SuiteTask(dataset="shards:b", name="b", task="zeroshot"),
        ]
    )
    specs = [ModelSpec(name, name, name, None, None, None, None, name) for name in ("x", "y", "z")]
    acc = {("x", 0): 0.5, ("y", 0): 0.7, ("z", 0): 0.7, ("x", 1): 0.9, ("y", 1): 0.1, ("z", 1): 0.2}
    records = {key: {"metrics": {"acc1": value}} for key, value in acc.items()}
    (table,) = leaderboard_tables(suite, specs, records)
    assert table.columns == ["model", "a", "b", "mean"]
    marked = [[isinstance(cell, Marked) for cell in row[1:]] for row in table.rows]
    # a: y and z tie at 0.7; b: x; mean: x (0.7) against y (0.4) and z (0.45)
    assert marked == [[False, True, True], [True, False, False], [True, False, False]]
    assert table.rows[0][3].value == pytest.approx(0.7)


def test_suite_files_are_validated_naming_the_field(tmp_path, suite_file):
    def error(content) -> str:
        file = tmp_path / "bad.yaml"
        file.write_text(yaml.safe_dump(content))
        with pytest.raises(ValueError) as caught:
            load_suite(file)
        return str(caught.value)

    good = {"dataset": suite_file[1]["shards"], "task": "zeroshot"}
    assert error({"tasks": [good, {"dataset": 5, "task": "zeroshot"}]}).startswith(
        "tasks[1].dataset:"
    )
    assert error(
        {"tasks": [good, {"dataset": "torchvision:CIFAR10", "task": "zeroshot"}]}
    ).startswith("tasks[1].dataset:")
    assert error({"tasks": [{"dataset": "a", "task": "caption"}]}).startswith("tasks[0].task:")
    assert error({"tasks": [{"dataset": "a", "task": "knn"}]}).startswith("tasks[0].train:")
    assert error({"tasks": [{"dataset": "a", "task": "zeroshot", "k": 3}]}).startswith(
        "tasks[0].k: not a field of task 'zeroshot'"
    )
    assert error({"tasks": [{"dataset": "a", "task": "knn", "train": "b", "k": 0}]}).startswith(
        "tasks[0].k:"
    )
    assert error({"tasks": [{"task": "zeroshot"}]}).startswith("tasks[0].dataset: missing")
    assert error({"suites": []}).startswith("suite file")
    clash = [{"dataset": "a", "task": "zeroshot", "name": "x"},
             {"dataset": "b", "task": "zeroshot", "name": "x"}]  # fmt: skip
    assert error({"tasks": clash}).startswith("tasks[1].name:")
    # the grouped form: a dataset and its tasks
    group = {"dataset": "a", "tasks": ["zeroshot", {"task": "knn", "train": "b", "k": 0}]}
    assert error({"datasets": [group]}).startswith("datasets[0].tasks[1].k:")
    assert error({"datasets": [{"tasks": ["zeroshot"]}]}).startswith("datasets[0].dataset: missing")
    assert error(
        {"datasets": [{"dataset": "a", "tasks": [{"task": "knn", "name": "x"}]}]}
    ).startswith("datasets[0].tasks[0].name: set on the dataset")
    assert error({"datasets": [{"dataset": "a", "tasks": [3]}]}).startswith("datasets[0].tasks[0]:")
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({"tasks": [
        {"dataset": "a", "name": "n", "task": "zeroshot"},
        {"dataset": "a", "name": "n", "task": "knn", "train": "b", "k": 3},
    ]}))  # fmt: skip
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text(yaml.safe_dump({"datasets": [
        {"dataset": "a", "name": "n", "tasks": ["zeroshot", {"task": "knn", "train": "b", "k": 3}]}
    ]}))  # fmt: skip
    assert [e.options() for e in load_suite(flat).tasks] == [
        e.options() for e in load_suite(grouped).tasks
    ]


def test_two_processes_embed_every_sample_once_in_order(models, suite_file, patched, tmp_path):
    """--devices 2 (gloo, a spawned worker): each rank embeds a contiguous half (of the
    images of the tree and the CSV; of the 2 shards), merged in order: the embeddings and the
    records equal those of one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_benchmark(models[:1], suite_file, one) == 0
    assert run_benchmark(models[:1], suite_file, two, "--devices", "2") == 0
    single, double = results(one), results(two)
    assert single.keys() == double.keys()
    for key, record in single.items():
        assert double[key]["metrics"] == pytest.approx(record["metrics"], abs=1e-6), key
    files = sorted(p.relative_to(one) for p in (one / "cache").rglob("*-captions-*.pt"))
    files += sorted(p.relative_to(one) for p in (one / "cache").rglob("*-images.pt"))
    assert len(files) == 3  # shards and CSV with captions, the tree without
    for file in files:
        a = torch.load(one / file, weights_only=True)
        b = torch.load(two / file, weights_only=True)
        assert b["keys"] == a["keys"] and len(set(a["keys"])) == len(a["keys"]) == 10 * PER_CLASS
        assert torch.equal(b["labels"], a["labels"])
        torch.testing.assert_close(b["image_features"], a["image_features"])
        if a["texts"] is not None:
            assert b["texts"] == a["texts"] and torch.equal(b["text_image"], a["text_image"])
            torch.testing.assert_close(b["text_features"], a["text_features"])


def test_models_are_named_by_run_when_checkpoint_names_repeat(tmp_path):
    files = []
    for run in ("small", "large"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        files.append(tmp_path / run / "checkpoints" / "last.ckpt")
        files[-1].write_bytes(run.encode())
    specs = benchmark.model_specs([str(f) for f in files], None, [])
    assert [s.label for s in specs] == ["small/last", "large/last"]
    assert [s.model for s in specs] == ["last", "last"]  # CLIP_benchmark's model field
    assert specs[0].fingerprint != specs[1].fingerprint  # different bytes
    assert specs[0].sha256 == benchmark.file_sha256(files[0])
    with pytest.raises(ValueError, match="--compare 'medium': not a model of the suite"):
        benchmark._compare_pair(specs, ["small/last", "medium"])
    with pytest.raises(ValueError, match="--open-clip 'ViT-B-32': expected NAME:FILE"):
        benchmark.model_specs([], None, ["ViT-B-32"])


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def test_an_open_clip_model_gives_the_single_commands_numbers(suite_file, tmp_path, capsys):
    import open_clip

    name = f"test-bench-clip-{uuid.uuid4().hex[:8]}"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = tmp_path / "tiny_open_clip.pt"
    torch.save(open_clip.create_model(name).state_dict(), weights)
    shards = suite_file[1]["shards"]
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        yaml.safe_dump({"datasets": [{"dataset": shards, "tasks": ["zeroshot", "retrieval"]}]})
    )
    out = tmp_path / "bench"
    argv = ["--open-clip", f"{name}:{weights}", "--tasks", str(suite), "--out", str(out), *BATCH]
    assert benchmark_main(argv) == 0
    records = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    assert [(r["model"], r["pretrained"]) for r in records] == [(name, str(weights))] * 2
    reference = tmp_path / "single"
    single = ["--open-clip", name, "--checkpoint", str(weights), "--data", shards,
              "--out", str(reference), "--examples", "0", *BATCH]  # fmt: skip
    assert zeroshot_main(single) == 0
    expected = json.loads((reference / "metrics.json").read_text())["zeroshot"]
    assert records[0]["metrics"]["acc5"] == expected["top5"]
    assert records[0]["metrics"]["acc1"] == expected["top1"]
    assert retrieval_main(single) == 0
    expected = json.loads((reference / "metrics.json").read_text())["retrieval"]
    assert records[1]["metrics"]["image_retrieval_recall@5"] == expected["text_to_image/recall@5"]
    assert records[1]["metrics"]["text_retrieval_recall@5"] == expected["image_to_text/recall@5"]

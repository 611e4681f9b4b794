"""The suite file of `multimodal benchmark`: which tasks to run on which datasets, validated
into one `SuiteTask` a task (a ValueError names the entry and field: `tasks[1].dataset: ...`).

Two forms, usable together in one file:

    tasks:                       # one entry a task, naming its dataset
      - {dataset: shards:data/digits/test, name: digits, task: zeroshot}
      - {dataset: shards:data/digits/test, name: digits, task: retrieval, captions: all}
      - {dataset: "imagefolder:scans", task: zeroshot, classes: digits, templates: digits}
      - {dataset: csv:test.csv, task: linear_probe, train: csv:train.csv}
      - {dataset: csv:test.csv, task: knn, train: csv:train.csv, k: 5, shots: 4}
    datasets:                    # one entry a dataset, listing its tasks
      - dataset: shards:data/digits/test
        name: digits
        tasks: [zeroshot, retrieval, {task: linear_probe, train: shards:data/digits/train}]

`dataset` and `train` are data specs as `multimodal zeroshot --data` takes them
(`multimodal.eval.datasets`: shards, imagefolder:DIR, torchvision:NAME:ROOT, csv:FILE,
jsonl:FILE, or the dict form).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from multimodal.eval.datasets import EXPECTED_SPEC, DatasetSpec, parse_spec
from multimodal.eval.evaluate import CAPTIONS

SUITE_TASKS = ("zeroshot", "retrieval", "linear_probe", "knn")
TASK_FIELDS = {
    "zeroshot": {"classes", "templates"},
    "retrieval": {"captions", "max_memory_mib"},
    "linear_probe": {"train", "seed"},
    "knn": {"train", "k", "shots", "seed"},
}
COMMON_FIELDS = {"dataset", "name", "task"}


def _spec_name(spec: DatasetSpec) -> str:
    if spec.kind == "torchvision":
        return f"{spec.dataset}-{spec.split}".lower()
    path = Path(spec.path.rstrip("/"))
    name = path.stem if spec.kind in ("csv", "jsonl") else path.name
    return name or str(spec)


@dataclass
class SuiteTask:
    """One task entry of a suite: a dataset and what to run on it; validated on creation
    (a ValueError names the bad field).

    Args:
        dataset: a data spec (string or dict form, `multimodal.eval.datasets`).
        task: one of `SUITE_TASKS`.
        name: the dataset's name in results and report (default: from the spec).
        classes, templates: zero-shot class names and prompts (built-in names or files;
            default: the data's class names and the matching built-in templates).
        captions: retrieval captions, "all" or "txt".
        max_memory_mib: retrieval's memory for one block of the similarity matrix.
        train: the labelled training data of linear_probe / knn (a data spec).
        k, shots: knn's neighbours and training images a class (None: all).
        seed: the probes' validation split and few-shot draw.
    """

    dataset: str | dict[str, Any]
    task: str
    name: str | None = None
    classes: str | None = None
    templates: str | None = None
    captions: str = "all"
    max_memory_mib: int = 512
    train: str | dict[str, Any] | None = None
    k: int = 5
    shots: int | None = None
    seed: int = 0
    spec: DatasetSpec = field(init=False, repr=False)
    train_spec: DatasetSpec | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.task not in SUITE_TASKS:
            raise ValueError(f"task: {self.task!r} must be one of {list(SUITE_TASKS)}")
        try:
            self.spec = parse_spec(self.dataset)
        except (ValueError, TypeError) as error:
            raise ValueError(f"dataset: {error} (expected {EXPECTED_SPEC})") from None
        if self.name is None:
            self.name = _spec_name(self.spec)
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: {self.name!r} must be a non-empty string")
        for key in ("classes", "templates"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key}: {value!r} must be a built-in name or a file path")
        if self.captions not in CAPTIONS:
            raise ValueError(f"captions: {self.captions!r} must be one of {list(CAPTIONS)}")
        for key in ("max_memory_mib", "k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: {value!r} must be an int >= 1")
        if self.shots is not None and (
            isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1
        ):
            raise ValueError(f"shots: {self.shots!r} must be an int >= 1 or null (all)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: {self.seed!r} must be an int")
        if self.task in ("linear_probe", "knn"):
            if self.train is None:
                raise ValueError(f"train: task {self.task} needs labelled training data (a spec)")
            try:
                self.train_spec = parse_spec(self.train)
            except (ValueError, TypeError) as error:
                raise ValueError(f"train: {error} (expected {EXPECTED_SPEC})") from None

    @classmethod
    def from_dict(cls, value: Any) -> SuiteTask:
        """An entry from its YAML mapping; unknown fields and fields of another task are
        refused by name."""
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping with dataset and task, got {value!r}")
        for required in ("dataset", "task"):
            if required not in value:
                raise ValueError(f"{required}: missing")
        task = value["task"]
        allowed = COMMON_FIELDS | TASK_FIELDS.get(task, set())
        for key in value:
            if key not in allowed:
                raise ValueError(f"{key}: not a field of task {task!r} (fields: {sorted(allowed)})")
        return cls(**dict(value))

    def options(self) -> dict[str, Any]:
        """The fields that shape this task's result (for its cell identity)."""
        keep = COMMON_FIELDS | TASK_FIELDS[self.task]
        out = {k: v for k, v in asdict(self).items() if k in keep and k not in ("dataset", "name")}
        out["dataset"] = str(self.spec)
        if self.train_spec is not None:
            out["train"] = str(self.train_spec)
        return out


@dataclass
class Suite:
    """The task entries of a suite file; column labels made unique (`name`, then
    `name: task`, then `name: task #i`)."""

    tasks: list[SuiteTask]
    origins: list[str] | None = None  # where each entry is in the file (error messages)
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: the suite lists no task")
        origins = self.origins or [f"tasks[{i}]" for i in range(len(self.tasks))]
        specs: dict[str, str] = {}
        for i, entry in enumerate(self.tasks):
            known = specs.setdefault(entry.name, str(entry.spec))
            if known != str(entry.spec):
                raise ValueError(
                    f"{origins[i]}.name: {entry.name!r} already names {known}; give "
                    f"{entry.spec} another name"
                )
        seen: dict[tuple[str, str], int] = {}
        self.labels = []
        for entry in self.tasks:
            count = seen.get((entry.name, entry.task), 0)
            seen[(entry.name, entry.task)] = count + 1
            self.labels.append(entry.name if count == 0 else f"{entry.name} #{count + 1}")


def _grouped_entries(groups: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, entry mapping) of each task of the grouped form: `datasets:` a list of
    {dataset, name (optional), tasks: [TASK or {task: TASK, option: value, ...}]}."""
    if not isinstance(groups, list):
        raise ValueError(f"datasets: expected a list of datasets, got {groups!r}")
    for i, group in enumerate(groups):
        where = f"datasets[{i}]"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where}: expected a mapping with dataset and tasks, got {group!r}")
        for key in group:
            if key not in ("dataset", "name", "tasks"):
                raise ValueError(f"{where}.{key}: not a field (fields: dataset, name, tasks)")
        for key in ("dataset", "tasks"):
            if key not in group:
                raise ValueError(f"{where}.{key}: missing")
        if not isinstance(group["tasks"], list) or not group["tasks"]:
            raise ValueError(f"{where}.tasks: expected a non-empty list of tasks")
        for j, item in enumerate(group["tasks"]):
            if isinstance(item, str):
                item = {"task": item}
            if not isinstance(item, Mapping):
                raise ValueError(
                    f"{where}.tasks[{j}]: expected a task name or a mapping with task, got {item!r}"
                )
            for key in ("dataset", "name"):
                if key in item:
                    raise ValueError(f"{where}.tasks[{j}].{key}: set on the dataset, not a task")
            shared = {k: group[k] for k in ("dataset", "name") if k in group}
            yield f"{where}.tasks[{j}]", {**shared, **item}


def load_suite(path: str | os.PathLike) -> Suite:
    """The suite of a YAML file, in either form (or both):

        tasks:                       # one entry a task, naming its dataset
          - {dataset: SPEC, name: NAME, task: zeroshot, classes: digits}
        datasets:                    # one entry a dataset, listing its tasks
          - dataset: SPEC
            name: NAME
            tasks: [zeroshot, retrieval, {task: knn, train: SPEC, k: 10}]

    ValueError naming the bad entry and field (`tasks[1].dataset: ...`,
    `datasets[0].tasks[2].k: ...`)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"suite file {str(path)!r} does not exist")
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"suite file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(content, Mapping) or not ({"tasks", "datasets"} & set(content)):
        raise ValueError(
            f"suite file {str(path)!r}: expected a mapping with a `tasks:` list of entries "
            "(dataset, task, ...) and/or a `datasets:` list (dataset, name, tasks)"
        )
    unknown = sorted(set(content) - {"tasks", "datasets"})
    if unknown:
        raise ValueError(
            f"suite file {str(path)!r}: unknown keys {unknown} (expected tasks and/or datasets)"
        )
    flat = content.get("tasks", [])
    if not isinstance(flat, list):
        raise ValueError(f"tasks: expected a list of entries, got {flat!r}")
    values = [(f"tasks[{i}]", value) for i, value in enumerate(flat)]
    values += list(_grouped_entries(content.get("datasets", [])))
    entries = []
    for where, value in values:
        try:
            entries.append(SuiteTask.from_dict(value))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}.{error}") from None
    return Suite(entries, [where for where, _ in values])

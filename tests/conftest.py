import os
from pathlib import Path

import pytest
import torch

from multimodal.short_runs import PRECISION_ENV
from multimodal.train.cpu_precision import cpu_has_native_bf16

# The configs train in bf16-mixed, which CPUs without native bf16 emulate ~17x slower than
# fp32: there every config a test runs (in this process or in a subprocess, which inherits the
# variable) trains in fp32 instead. Tests of bf16 itself pass their precision explicitly.
if cpu_has_native_bf16() is False and not torch.cuda.is_available():
    os.environ.setdefault(PRECISION_ENV, "32-true")

# Under pytest-xdist (`make test` runs two workers) each worker, and every process it starts,
# gets its share of the cores: torch's default of one thread per core in each worker would
# oversubscribe the CPU and spin.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


# The longest tests, longest first (seconds on an idle 2-core machine, `make test`): 518 README,
# 400 the captioning and VQA configs learning, 159 LoRA. pytest-xdist hands tests out in
# collection order as workers free up, so started last these ran alone at the end; started
# first, the short tests fill in around them and both workers finish together.
LONGEST_FIRST = (
    "tests/test_readme.py",
    "tests/tasks/test_vl_learning.py",
    "tests/adapt/test_adapt_learning.py",
)


def longest_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` reordered: the modules of `LONGEST_FIRST` in its order, then every other module
    that holds a `slow` test, then the rest; modules kept whole and in collection order."""
    slow = {item.path for item in items if "slow" in item.keywords}
    root = Path(__file__).resolve().parents[1]

    def rank(item: pytest.Item) -> int:
        name = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (item.path not in slow)

    return sorted(items, key=rank)  # stable: collection order within a rank


def ungrouped(items: list[pytest.Item]) -> list[str]:
    """The node ids of tests marked `xdist_group` that pytest-xdist's `--dist loadgroup` did not
    tag with their group (`...::test@group`): its scheduler then sends them to any worker, and
    a module fixture meant to run once (the demo run) runs on each. pytest 9.2 broke the tag
    (xdist 3.8 sets `item._nodeid`, which 9.2's `nodeid` no longer reads; pytest-xdist issue
    #1386): hence `pytest<9.2` in the dev extra, and this check, so that a future break fails
    loudly."""
    return [
        item.nodeid
        for item in items
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid
    ]


UNTAGGED: set[str] = set()  # filled on each xdist worker; those tests fail at setup


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook has tagged the groups
def pytest_collection_modifyitems(config, items):
    if getattr(config.option, "loadgroup", False):
        UNTAGGED.update(ungrouped(items))
    items[:] = longest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)  # before the fixtures (the demo run) are set up
def pytest_runtest_setup(item):
    if item.nodeid in UNTAGGED:
        pytest.fail(
            f"pytest {pytest.__version__} with --dist loadgroup left this xdist_group test "
            "untagged, so its group's shared fixture runs on every worker: install the dev "
            "extra's pins (pip install -e '.[dev]' -c constraints.txt; pytest<9.2)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo digits shards and tokenizer, written once per test session."""
    from multimodal.data.demo import write_demo_shards

    root = tmp_path_factory.mktemp("digits")
    write_demo_shards(root, progress=False)
    return root


@pytest.fixture(scope="session")
def trained_digits_clip(demo_shards, tmp_path_factory):
    """configs/clip/digits.yaml trained as configured (32 epochs) on the demo shards, once per
    test run: its LightningCLI (model and datamodule; the datamodule's val split is the TEST
    split, images never trained on) and a checkpoint `load_task` reads. The learning tests of
    CLIP, distillation and int8 quantization share it instead of each training their own.

    Under pytest-xdist their `xdist_group` mark sends them to one worker (a split measured in
    2 of 4 runs was likely pytest 9.2 leaving the groups untagged: see `ungrouped`); should they
    still land on two, the workers share one checkpoint in the run's temp folder: the first
    trains it under a file lock, the others wait and load its weights."""
    from filelock import FileLock

    from tests.helpers import cli_from_config, save_task

    cli = cli_from_config(
        "clip/digits.yaml",
        "--data.init_args.train_urls", str(demo_shards / "train"),
        "--data.init_args.val_urls", str(demo_shards / "test"),
        "--data.init_args.num_workers", "2",
        "--trainer.limit_val_batches", "0",
    )  # fmt: skip
    shared = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        shared = shared.parent  # the folder of this run that every worker's folder is in
    path = shared / "trained_digits_clip.ckpt"
    with FileLock(f"{path}.lock"):
        if path.is_file():
            cli.model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        else:
            cli.trainer.fit(cli.model, cli.datamodule)
            partial = path.with_suffix(".partial")
            os.replace(save_task(cli.model, partial), path)
    return cli, path

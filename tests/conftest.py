import os

import pytest
import torch

from multimodal.short_runs import PRECISION_ENV
from multimodal.train.cpu_precision import cpu_has_native_bf16

# The configs train in bf16-mixed, which CPUs without native bf16 emulate ~17x slower than
# fp32: there every config a test runs (in this process or in a subprocess, which inherits the
# variable) trains in fp32 instead. Tests of bf16 itself pass their precision explicitly.
if cpu_has_native_bf16() is False and not torch.cuda.is_available():
    os.environ.setdefault(PRECISION_ENV, "32-true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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

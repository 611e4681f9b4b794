import pytest
import torch


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

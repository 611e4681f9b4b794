"""Zero-shot, retrieval, captioning and VQA metrics, and the reports written from them.

The names below are imported on first use (PEP 562), so that importing one submodule (the
metrics, say) does not load Lightning, the data pipeline and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ZeroShotRetrievalCallback": "multimodal.eval.callback",
    "LoadedModel": "multimodal.eval.loading",
    "load_model": "multimodal.eval.loading",
    "run_zeroshot": "multimodal.eval.evaluate",
    "run_retrieval": "multimodal.eval.evaluate",
    "eval_loader": "multimodal.eval.evaluate",
    "ZeroShotResult": "multimodal.eval.zeroshot",
    "zeroshot_evaluate": "multimodal.eval.zeroshot",
    "zeroshot_classifier": "multimodal.eval.zeroshot",
    "RetrievalResult": "multimodal.eval.retrieval",
    "retrieval_metrics": "multimodal.eval.retrieval",
    "topk_retrieval": "multimodal.eval.retrieval",
    "Report": "multimodal.eval.report",
    "write_report": "multimodal.eval.report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

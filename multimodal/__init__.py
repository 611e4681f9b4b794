"""Training and evaluation of vision, text and vision-language transformers.

`multimodal.load(checkpoint_or_name)` returns a model ready for inference
(`multimodal.export.api`); it is imported on first use, so `import multimodal` stays cheap
(no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]

_LAZY = {"load": "multimodal.export.api"}  # attribute -> the module that defines it


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'multimodal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

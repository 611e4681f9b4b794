"""Initialise a model from another run's weights (`init_from`): weights only, the keys that
match (or every key, strictly), optionally renamed by a prefix map, with a report of what was
loaded and what was not.

This is how a fine-tuning run starts from a pretraining run (a classifier from a masked LM):
unlike resuming (`--ckpt_path`), nothing but matching weights is taken, so the two runs may
differ in task, heads, optimiser and data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch import Tensor, nn

from multimodal.train.checkpoint_file import read_weights

SHOWN = 3  # key names listed per row of the report


@dataclass
class InitReport:
    """What `load_init_weights` did, key by key (model key names, after the prefix map).

    Attributes:
        path: the weights file.
        loaded: keys copied into the model.
        missing: model keys the file does not give (they keep their initialisation).
        unexpected: file keys the model does not have.
        mismatched: keys of both with different shapes ("key: file (..), model (..)").
        unmapped: file keys outside every prefix of the prefix map (left out on purpose).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, list[str]]]:
        return [
            ("loaded", self.loaded),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
            ("not in prefix map", self.unmapped),
        ]

    def table(self, shown: int = SHOWN) -> str:
        """One line per kind of key: count and the first `shown` names."""
        lines = [f"init_from {self.path}:"]
        for name, keys in self.rows():
            listing = ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
            lines.append(f"  {name:<18} {len(keys):>5}  {listing}".rstrip())
        return "\n".join(lines)


def map_keys(
    state: dict[str, Tensor], prefix_map: dict[str, str] | None
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename the keys of `state` by their longest matching prefix of `prefix_map`
    ({old prefix: new prefix}); keys matching none are returned apart (unmapped). Without a
    map every key is kept as it is."""
    if not prefix_map:
        return dict(state), []
    prefixes = sorted(prefix_map, key=len, reverse=True)
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        old = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
        if old is None:
            unmapped.append(key)
        else:
            mapped[prefix_map[old] + key.removeprefix(old)] = value
    return mapped, sorted(unmapped)


def load_init_weights(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = False,
    prefix_map: dict[str, str] | None = None,
) -> InitReport:
    """Copy the weights of `path` (Lightning checkpoint, state dict or .safetensors, read
    weights-only) into `module`, keys renamed by `prefix_map`.

    Non-strict (default): every key present in both with equal shapes is loaded, the rest
    is reported. Strict: any missing, unexpected or mismatched key is a ValueError naming it.
    Loading nothing at all is always a ValueError (a wrong file or prefix map).
    """
    if prefix_map is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prefix_map.items()
    ):
        raise ValueError(f"init_prefix_map={prefix_map!r} must map str prefixes to str prefixes")
    state, unmapped = map_keys(read_weights(path), prefix_map)
    expected = module.state_dict()
    report = InitReport(str(path), unmapped=unmapped)
    for key in expected:
        if key not in state:
            report.missing.append(key)
        elif state[key].shape != expected[key].shape:
            report.mismatched.append(
                f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
            )
        else:
            report.loaded.append(key)
    report.unexpected = sorted(state.keys() - expected.keys())
    if strict and (report.missing or report.unexpected or report.mismatched):
        problems = "; ".join(
            f"{len(keys)} {name} ({', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''})"
            for name, keys in report.rows()[1:4]
            if keys
        )
        raise ValueError(
            f"init_from {str(path)!r} does not fit {type(module).__name__} strictly: {problems} "
            "(init_strict=false loads the matching keys only)"
        )
    if not report.loaded:
        raise ValueError(
            f"init_from {str(path)!r}: no key fits {type(module).__name__} "
            f"({len(state)} keys in the file after the prefix map, e.g. "
            f"{', '.join(sorted(state)[:SHOWN]) or 'none'}; the model has e.g. "
            f"{', '.join(list(expected)[:SHOWN])}): check the file and init_prefix_map"
        )
    module.load_state_dict({key: state[key] for key in report.loaded}, strict=False)
    return report

"""Class names and prompt templates for zero-shot classification: built-in lists and user files.

A template is either a string in which every `{}` is replaced by the class name ("a photo of a
{}.") or a callable `class_name -> prompt` (the digits demo's templates, which also need the
numeral). `class_names(name_or_path)` and `templates(name_or_path)` take a built-in name
(`BUILTINS`) or a user file:

- `.txt`: one entry per line; blank lines and lines starting with `#` are ignored.
- `.json`: a list of strings, or `{"classes": [...], "templates": [...]}`.

ImageNet's names and OpenAI's templates come from open_clip (`open_clip.zero_shot_metadata`);
open_clip ships no CIFAR lists, so those are written here from the published definitions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Template = str | Callable[[str], str]
PLACEHOLDER = "{}"

CIFAR10_CLASSNAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# CIFAR-100 fine labels in the order of the dataset's meta file (alphabetical by label),
# with underscores written as spaces as in OpenAI's CLIP evaluation.
CIFAR100_CLASSNAMES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm",
)  # fmt: skip

# The 18 CIFAR-10/100 templates of OpenAI's CLIP repository (data/prompts.md).
CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


@dataclass(frozen=True)
class DigitTemplate:
    """A digits demo template (`{name}` the digit's word, `{digit}` its numeral) applied to a
    digit word: `DigitTemplate("a handwritten {digit}")("seven") == "a handwritten 7"`."""

    template: str

    def __call__(self, class_name: str) -> str:
        from multimodal.data.digits import DIGIT_NAMES  # the data package, only when used

        if class_name not in DIGIT_NAMES:
            raise ValueError(f"{class_name!r} is not a digit word; expected one of {DIGIT_NAMES}")
        return self.template.format(name=class_name, digit=DIGIT_NAMES.index(class_name))

    def __str__(self) -> str:
        return self.template


def _imagenet_classes() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def _openai_templates(which: str) -> Callable[[], tuple[str, ...]]:
    def load() -> tuple[str, ...]:
        import open_clip.zero_shot_metadata as metadata

        # open_clip's templates are lambdas `c -> f"...{c}..."`: applied to "{}", they give
        # the same template as a string (checked for every one in the tests)
        return tuple(t(PLACEHOLDER) for t in getattr(metadata, which))

    return load


def _digit_classes() -> tuple[str, ...]:
    from multimodal.data.digits import DIGIT_NAMES

    return tuple(DIGIT_NAMES)


def _digit_templates() -> tuple[Template, ...]:
    from multimodal.data.demo import HELD_OUT_TEMPLATES

    return tuple(DigitTemplate(t) for t in HELD_OUT_TEMPLATES)


_CLASSES: dict[str, Callable[[], tuple[str, ...]]] = {
    "imagenet": _imagenet_classes,
    "cifar10": lambda: CIFAR10_CLASSNAMES,
    "cifar100": lambda: CIFAR100_CLASSNAMES,
    "digits": _digit_classes,
}
_TEMPLATES: dict[str, Callable[[], tuple[Template, ...]]] = {
    "imagenet": _openai_templates("OPENAI_IMAGENET_TEMPLATES"),  # 80 templates
    "imagenet_simple": _openai_templates("SIMPLE_IMAGENET_TEMPLATES"),  # 7 templates
    "cifar10": lambda: CIFAR_TEMPLATES,
    "cifar100": lambda: CIFAR_TEMPLATES,
    "digits": _digit_templates,  # the demo's held-out templates, never seen in training
}
BUILTINS = tuple(_CLASSES)
BUILTIN_TEMPLATES = tuple(_TEMPLATES)


def class_names(name_or_path: str | Path) -> tuple[str, ...]:
    """The class names of a built-in dataset (`BUILTINS`) or of a `.txt`/`.json` file."""
    name = str(name_or_path)
    if name in _CLASSES:
        return _CLASSES[name]()
    entries = _read_entries(name_or_path, "classes", BUILTINS)
    names = []
    for where, entry in entries:
        if not entry:
            raise ValueError(f"{where}: empty class name")
        names.append(entry)
    if not names:
        raise ValueError(f"{name}: no class names")
    return tuple(names)


def templates(name_or_path: str | Path) -> tuple[Template, ...]:
    """The prompt templates of a built-in set (`BUILTIN_TEMPLATES`) or of a `.txt`/`.json`
    file; every file template must contain `{}`, the place of the class name."""
    name = str(name_or_path)
    if name in _TEMPLATES:
        return _TEMPLATES[name]()
    result = []
    for where, entry in _read_entries(name_or_path, "templates", BUILTIN_TEMPLATES):
        if PLACEHOLDER not in entry:
            raise ValueError(
                f"{where}: template {entry!r} has no {PLACEHOLDER} for the class name "
                f"(write e.g. 'a photo of a {PLACEHOLDER}.')"
            )
        result.append(entry)
    if not result:
        raise ValueError(f"{name}: no templates")
    return tuple(result)


def render_prompts(names: Sequence[str], template_list: Sequence[Template]) -> list[list[str]]:
    """For each class, its prompts: every template applied to the class name."""
    if isinstance(names, str) or isinstance(template_list, str):
        raise TypeError("class names and templates are sequences; wrap a single one in [ ]")
    if not names:
        raise ValueError("no class names")
    if not template_list:
        raise ValueError("no templates")
    for template in template_list:
        if isinstance(template, str):
            if PLACEHOLDER not in template:
                raise ValueError(f"template {template!r} has no {PLACEHOLDER} for the class name")
        elif not callable(template):
            raise TypeError(f"template {template!r} is neither a str nor a callable")
    return [[_render(t, name) for t in template_list] for name in names]


def _render(template: Template, name: str) -> str:
    # str.replace, not str.format: other braces in a template stay literal
    return template.replace(PLACEHOLDER, name) if isinstance(template, str) else template(name)


def _read_entries(
    name_or_path: str | Path, key: str, builtins: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(location, stripped entry) pairs of a `.txt` or `.json` file; the location is
    `file:line` for text files and `file[index]` for JSON lists."""
    path = Path(name_or_path)
    if path.suffix not in (".txt", ".json"):
        raise ValueError(
            f"{str(name_or_path)!r} is neither a built-in ({', '.join(builtins)}) "
            "nor a .txt or .json file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        lines = ((f"{path}:{i}", line.strip()) for i, line in enumerate(text.splitlines(), 1))
        return [(where, line) for where, line in lines if line and not line.startswith("#")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    where = str(path)
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"{path}: the JSON object has no {key!r} list (keys: {list(data)})")
        data, where = data[key], f"{path}[{key!r}]"
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of strings, got {type(data).__name__}")
    entries = []
    for i, entry in enumerate(data):
        if not isinstance(entry, str):
            raise ValueError(f"{where}[{i}]: expected a string, got {entry!r}")
        entries.append((f"{where}[{i}]", entry.strip()))
    return entries

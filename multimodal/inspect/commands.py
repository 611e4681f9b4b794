"""`multimodal attention`: attention maps of a trained checkpoint over images, drawn as
overlays (PNG) with an `index.html` page.

For every image: the attention rollout of the image tower (Abnar & Zuidema 2020), optionally
the raw maps of chosen layers and heads, with --text the image-text similarity of a CLIP-style
model, and for a captioner the generated caption with, for each generated token, where its
cross-attention looked (heads averaged, last decoder layer by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from multimodal.eval.arguments import checkpoint_arguments, device_argument
from multimodal.inspect.maps import (
    can_compare_texts,
    caption_attention,
    image_attention,
    image_tower,
    is_captioner,
    text_similarities,
)
from multimodal.inspect.overlay import (
    DEFAULT_COLORMAP,
    display_image,
    overlay,
    save_png,
    write_atomic,
)
from multimodal.inspect.page import Figure, ImageEntry, render_page
from multimodal.inspect.rollout import (
    HEAD_FUSIONS,
    cross_attention_maps,
    layer_map,
    rollout_map,
    select_head,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INDEX_FILE = "index.html"
MANIFEST_FILE = "attention.json"
EXIT_BAD_INPUT = 2  # as argparse and the evaluation commands for errors in the user's input


def _layer(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a layer index (0 = first, -1 = last) or 'all', got {value!r}"
        ) from None


def _head(value: str) -> int | str:
    if value == "mean":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a head index or 'mean', got {value!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="multimodal attention",
        description=(
            "Attention maps of a trained model over images: the image tower's attention "
            "rollout (and with --layer the maps of single layers), the similarity to --text "
            "for CLIP-style models, and for captioners where each generated word looked; "
            "written as PNG overlays with DIR/index.html and DIR/attention.json."
        ),
    )
    checkpoint_arguments(p)
    p.add_argument(
        "--images", required=True, nargs="+", metavar="PATH", help="image files or folders"
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text to compare each image with (CLIP-style models; repeat for several)",
    )
    p.add_argument(
        "--layer",
        type=_layer,
        metavar="N|all",
        help=(
            "also draw the attention of layer N (0 = first, -1 = last) or of every layer; for "
            "a captioner's words the decoder layer (default: the last)"
        ),
    )
    p.add_argument(
        "--head",
        type=_head,
        default="mean",
        metavar="N|mean",
        help="the head of the per-layer and per-word maps, or the mean over heads (mean)",
    )
    p.add_argument(
        "--head-fusion",
        choices=list(HEAD_FUSIONS),
        default="mean",
        help="how the rollout fuses each layer's heads (mean)",
    )
    p.add_argument("--out", default="reports/attention", metavar="DIR", help="output folder")
    p.add_argument(
        "--size", type=int, default=224, metavar="PX", help="shown image size in pixels (224)"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the heatmap (0.5)")
    p.add_argument("--colormap", default=DEFAULT_COLORMAP, help="matplotlib colormap (jet)")
    device_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def collect_images(paths: Sequence[str]) -> list[Path]:
    """The image files named, and those inside named folders (sorted, not recursive)."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise ValueError(f"folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image {name!r} does not exist")
    return found


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from None


def _layers(choice: int | str | None, n_layers: int, default: list[int], what: str) -> list[int]:
    """Layer indices (non-negative) of a stack for --layer; `default` when not given."""
    if choice is None:
        return default
    if choice == "all":
        return list(range(n_layers))
    if not -n_layers <= choice < n_layers:
        raise ValueError(
            f"--layer {choice}: the {what} has {n_layers} layers (0 .. {n_layers - 1}, or "
            "negative from the last)"
        )
    return [choice % n_layers]


def _check_head(head: int | str, n_heads: int, what: str) -> None:
    if head != "mean" and not -n_heads <= head < n_heads:
        raise ValueError(
            f"--head {head}: the {what} has {n_heads} heads (0 .. {n_heads - 1}, or 'mean')"
        )


def _token_text(tokenizer: Any, token: int) -> str:
    """One generated token as text; an id the tokenizer does not know (a decoder vocabulary
    larger than the tokenizer's) as [id N]."""
    return tokenizer.decode([token], skip_special_tokens=False) or f"[id {token}]"


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:40] or "image"


def _head_label(head: int | str) -> str:
    return "heads averaged" if head == "mean" else f"head {head}"


def _head_suffix(head: int | str) -> str:
    return "" if head == "mean" else f"-head{head}"


def run(args: argparse.Namespace) -> Path:
    """Compute and write everything; returns the path of index.html."""
    from multimodal.checkpoint_check import check_torch_file
    from multimodal.eval.loading import load_model

    if args.size < 1:
        raise ValueError(f"--size={args.size} must be >= 1")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha={args.alpha} must be in [0, 1]")
    paths = collect_images(args.images)
    check_torch_file(args.checkpoint)
    loaded = load_model(args.checkpoint, config=args.config, device=args.device)
    model = loaded.model.eval()
    tower = image_tower(model)
    captioner = is_captioner(model)
    if args.text and not can_compare_texts(model):
        raise ValueError(
            f"--text needs a model that embeds images and texts together (CLIP, a CoCa-style "
            f"captioner); {type(model).__name__} does not"
        )
    n_tower = len(tower.encoder.blocks)
    image_layers = _layers(args.layer, n_tower, [], "image tower")
    _check_head(args.head, tower.config.n_heads, "image tower")
    word_layers: list[int] = []
    if captioner:
        stack = model.decoder.transformer
        n_decoder = len(stack.blocks)
        word_layers = _layers(args.layer, n_decoder, [n_decoder - 1], "decoder")
        _check_head(args.head, stack.config.n_heads, "decoder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw = {"alpha": args.alpha, "colormap": args.colormap}
    entries: list[ImageEntry] = []
    records: list[dict[str, Any]] = []
    device = next(model.parameters()).device
    for index, path in enumerate(
        tqdm(paths, desc="attention", unit="image", disable=args.no_progress)
    ):
        name = f"{index:03d}-{_safe(path.stem)}"
        pixels = loaded.transform(_open_rgb(path))[None].to(device)  # (1, C, H, W)
        shown = display_image(pixels[0], loaded.mean, loaded.std, args.size)
        entry = ImageEntry(str(path), Figure(f"{name}-image.png", "input (as the model sees it)"))
        save_png(shown, out / entry.image.file)
        record: dict[str, Any] = {"source": str(path), "image": entry.image.file}

        vit = image_attention(tower, pixels)
        rollout = rollout_map(vit.attentions, vit.layout, args.head_fusion)[0]
        file = f"{name}-rollout.png"
        save_png(overlay(shown, rollout, **draw), out / file)
        entry.figures.append(Figure(file, f"attention rollout ({args.head_fusion} of heads)"))
        record["rollout"] = file
        record["grid"] = list(vit.layout.grid)
        record["layers"] = []
        for layer in image_layers:
            attention = layer_map(vit.attentions, vit.layout, layer, args.head)[0]
            file = f"{name}-layer{layer}{_head_suffix(args.head)}.png"
            save_png(overlay(shown, attention, **draw), out / file)
            entry.figures.append(Figure(file, f"layer {layer}, {_head_label(args.head)}"))
            record["layers"].append({"layer": layer, "head": args.head, "file": file})

        if args.text:
            similarity = text_similarities(
                model, loaded.tokenizer, loaded.context_length, pixels, args.text
            )[0].tolist()
            entry.similarities = list(zip(args.text, similarity, strict=True))
            record["similarities"] = dict(entry.similarities)

        if captioner:
            caption = caption_attention(model, pixels)
            entry.caption = loaded.tokenizer.decode(caption.token_ids)
            record["caption"] = entry.caption
            record["words"] = []
            for layer in word_layers:
                maps = cross_attention_maps(
                    caption.cross_attentions, vit.layout.grid, layer, args.head
                )[0]  # (n_words, rows, columns)
                # (n_words, 1 + N): the same head(s), with the pooled image token's column
                weights = select_head(caption.cross_attentions[layer], args.head)[0]
                for position, token in enumerate(caption.token_ids):
                    word = _token_text(loaded.tokenizer, token)
                    suffix = "" if args.layer is None else f"-layer{layer}"
                    file = f"{name}-word{position:02d}{suffix}{_head_suffix(args.head)}.png"
                    save_png(overlay(shown, maps[position], **draw), out / file)
                    label = f"{position}: {word!r} (layer {layer}, {_head_label(args.head)})"
                    entry.words.append(Figure(file, label))
                    record["words"].append(
                        {
                            "position": position,
                            "token_id": token,
                            "word": word,
                            "layer": layer,
                            "head": args.head,
                            "file": file,
                            "pooled_share": float(weights[position, 0]),
                        }
                    )
        entries.append(entry)
        records.append(record)

    meta = {
        "model": loaded.description,
        "checkpoint": str(args.checkpoint),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    notes = [
        "Rollout: per layer the heads are fused, the identity added for the residual and rows "
        "normalised; the layers are multiplied from the first. The map is the "
        + (
            "class token's row (the tower pools its class token)"
            if tower.config.pool == "token"
            else "mean of the patch rows (the tower pools the patch tokens)"
        )
        + " over the patches. Each overlay is scaled to its own minimum and maximum."
    ]
    if captioner:
        notes.append(
            "Words: the decoder's cross-attention from the position that generated each token "
            "over the image patches (the pooled image token's share is left out)."
        )
    page = render_page("Attention maps", meta, entries, notes)
    index = write_atomic(out / INDEX_FILE, page.encode("utf-8"))
    manifest = {**meta, "head_fusion": args.head_fusion, "images": records}
    write_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return index


def main(argv: Sequence[str]) -> int:
    """`multimodal attention ...`; returns the exit status."""
    p = parser()
    args = p.parse_args(list(argv))
    try:
        index = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"{p.prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"attention maps: {index}")
    return 0

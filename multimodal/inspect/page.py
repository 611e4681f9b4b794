"""The `index.html` of `multimodal attention`: every image with its overlays, similarities and
generated words, referring to the PNG files next to it by relative paths (the folder can be
moved or served as it is); all text is escaped."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.meta dt { font-weight: 600; }
.row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; text-align: center; }
figcaption { font-size: .85em; max-width: 16em; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: left; }
.caption { font-size: 1.1em; margin: .5em 0; }
"""


@dataclass
class Figure:
    """An image file of the output folder (relative path) and what it shows."""

    file: str
    label: str


@dataclass
class ImageEntry:
    """One input image: the image as the model saw it, its attention figures (rollout,
    per-layer maps), its similarity to each --text, and a captioner's caption and words."""

    source: str
    image: Figure
    figures: list[Figure] = field(default_factory=list)
    similarities: list[tuple[str, float]] = field(default_factory=list)
    caption: str | None = None
    words: list[Figure] = field(default_factory=list)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _figure(figure: Figure) -> str:
    src = _e(quote(figure.file))
    return (
        f'<figure><img src="{src}" alt="{_e(figure.label)}">'
        f"<figcaption>{_e(figure.label)}</figcaption></figure>"
    )


def _entry(entry: ImageEntry) -> str:
    parts = [f"<section><h2>{_e(entry.source)}</h2>"]
    parts.append('<div class="row">')
    parts.append(_figure(entry.image))
    parts.extend(_figure(f) for f in entry.figures)
    if entry.similarities:
        rows = "".join(
            f"<tr><td>{_e(text)}</td><td>{value:.4f}</td></tr>"
            for text, value in entry.similarities
        )
        parts.append(
            "<table><thead><tr><th>text</th><th>cosine similarity</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    parts.append("</div>")
    if entry.caption is not None:
        parts.append(f'<p class="caption">Generated caption: <q>{_e(entry.caption)}</q></p>')
        if entry.words:
            parts.append('<div class="row">')
            parts.extend(_figure(f) for f in entry.words)
            parts.append("</div>")
        else:
            parts.append("<p>(the caption is empty: no word to show)</p>")
    parts.append("</section>")
    return "\n".join(parts)


def render_page(
    title: str, meta: Mapping[str, str], entries: Sequence[ImageEntry], notes: Sequence[str] = ()
) -> str:
    """A self-contained HTML page (inline style, relative image paths)."""
    meta_rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta.items())
    notes_html = "".join(f"<p>{_e(n)}</p>" for n in notes)
    body = "\n".join(_entry(e) for e in entries)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{_e(title)}</h1><dl class="meta">{meta_rows}</dl>{notes_html}\n{body}\n'
        "</body></html>\n"
    )

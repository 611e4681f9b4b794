"""One-line definitions of the zero-shot and retrieval report metrics, shown next to each value
(`Report.explanations`), and the caveat where a retrieval figure is degenerate by construction:
an image whose every caption is also, word for word, another image's caption cannot reach
image -> text rank 1 (the identical texts tie with its own, and ties count against the model,
see `multimodal.eval.retrieval`)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from multimodal.eval.report import flatten_metrics

# (pattern of the metric name's last parts, definition); {k} is the K of the name
DEFINITIONS: tuple[tuple[str, str], ...] = (
    (
        r"(^|/)zeroshot/top1$",
        "top-1: share of images whose highest-scoring class prompt is their label",
    ),
    (
        r"(^|/)zeroshot/top5$",
        "top-5: share of images whose label is among the 5 highest-scoring classes",
    ),
    (
        r"(^|/)zeroshot/mean_per_class_recall$",
        "mean per-class recall: top-1 accuracy within each class, averaged over the classes "
        "(each class counts equally, whatever its number of images)",
    ),
    (r"(^|/)n_samples$", "images evaluated"),
    (r"(^|/)n_classes$", "classes (one averaged prompt embedding each)"),
    (r"(^|/)linear_probe/top1$", "linear probe top-1 on the test images"),
    (
        r"(^|/)linear_probe/val_top1$",
        "linear probe top-1 on its validation split (pooled over the folds with cross-validation)",
    ),
    (
        r"(^|/)linear_probe(_zeroshot_prior)?/C$",
        "inverse L2 strength chosen on the validation split (or by cross-validation)",
    ),
    (
        r"(^|/)linear_probe(_zeroshot_prior)?/cv_folds$",
        "k of the stratified k-fold cross-validation that chose C",
    ),
    (
        r"(^|/)linear_probe(_zeroshot_prior)?/n_groups$",
        "groups of training images (keys equal but for --probe-group-pattern) that no "
        "validation split divides",
    ),
    (
        r"(^|/)linear_probe(_zeroshot_prior)?/cv_repeats$",
        "times the cross-validation was repeated, reshuffled (scores pooled)",
    ),
    (
        r"(^|/)linear_probe_zeroshot_prior/top1$",
        "linear probe pulled towards the zero-shot head: top-1 on the test images",
    ),
    (
        r"(^|/)linear_probe_zeroshot_prior/val_top1$",
        "the zero-shot-prior probe's top-1 on its validation split",
    ),
    (r"(^|/)knn/top1$", "k-NN top-1 on the test images (cosine, majority vote)"),
    (
        r"image_to_text/recall@(?P<k>\d+)$",
        "Recall@{k}: share of images with one of their own captions among the first {k} "
        "texts; ties count against the model",
    ),
    (
        r"text_to_image/recall@(?P<k>\d+)$",
        "Recall@{k}: share of captions whose own image is among the first {k} images; ties "
        "count against the model",
    ),
    (
        r"image_to_text/reachable_recall@(?P<k>\d+)$",
        "highest image->text Recall@{k} any model can reach on this data (captions shared "
        "word for word by other images tie with the image's own)",
    ),
    (r"/mean_rank$", "mean 1-based rank of the correct item (ties against the model)"),
    (r"/median_rank$", "median 1-based rank of the correct item (ties against the model)"),
    (r"(^|/)n_images$", "images (the gallery of text->image; captioned ones are queries)"),
    (r"(^|/)n_texts$", "captions (the gallery of image->text, each a query)"),
    (r"(^|/)captions$", "captions used: all of each image's, or txt: its main one"),
    (r"(^|/)images_with_shared_captions$", "images whose every caption another image shares"),
    (r"(^|/)retrieval_itm/k$", "candidates of each query re-ordered by the ITM head"),
    (r"(^|/)skipped/", "samples the reader skipped, by reason"),
    (r"(^|/)n_train$", "training images"),
    (r"(^|/)n_val$", "validation images"),
    (r"(^|/)n_test$", "test images"),
    (r"(^|/)n_C_tried$", "L2 strengths tried"),
    (r"(^|/)knn/k$", "neighbours voting"),
    (r"(^|/)shots_per_class$", "training images a class (all: null)"),
)
ITM_PREFIX = "after ITM re-ranking: "


def explain(metrics: Mapping[str, Any], caveats: Mapping[str, str] | None = None) -> dict[str, str]:
    """Flattened metric name -> its one-line definition (for `Report.explanations`), with
    `caveats` (name -> text) appended as "⚠ text"; names without a definition are left out."""
    out: dict[str, str] = {}
    for name, _ in flatten_metrics(metrics):
        for pattern, text in DEFINITIONS:
            match = re.search(pattern, name)
            if match:
                line = text.format(**match.groupdict())
                if name.startswith("retrieval_itm/") and not name.endswith("/k"):
                    line = ITM_PREFIX + line
                out[name] = line
                break
        if caveats and name in caveats:
            out[name] = f"{out.get(name, '')} ⚠ {caveats[name]}".strip()
    return out


def reachable_image_to_text(
    texts: Sequence[str], text_image: Sequence[int], ks: Sequence[int]
) -> tuple[int, int, dict[int, float]]:
    """(query images, images whose every caption another image shares word for word,
    {K: the highest image -> text Recall@K reachable}). An image's best possible rank is
    1 + the fewest other images' texts identical to one of its captions: identical texts
    get identical embeddings, so they tie with its own caption, and ties count against it."""
    owners: dict[str, list[int]] = defaultdict(list)
    for text, image in zip(texts, text_image, strict=True):
        owners[text].append(int(image))
    captions: dict[int, set[str]] = defaultdict(set)
    for text, image in zip(texts, text_image, strict=True):
        captions[int(image)].add(text)
    best_rank = {
        image: 1 + min(sum(1 for o in owners[t] if o != image) for t in own)
        for image, own in captions.items()
    }
    shared = sum(1 for rank in best_rank.values() if rank > 1)
    n = len(best_rank)
    reachable = {k: sum(1 for r in best_rank.values() if r <= k) / n for k in ks}
    return n, shared, reachable

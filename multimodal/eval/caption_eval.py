"""`multimodal caption-eval`: a captioning checkpoint writes a caption for every image of the
shards, scored against all the reference captions of each image: corpus BLEU-1..4, ROUGE-L,
CIDEr-D (`multimodal.eval.caption_metrics`) and exact match; written to metrics.json (with the
meta data), summary.md, report.html (the best and worst captions by per-image CIDEr-D, with
their images) and predictions.jsonl (one line per image).

Captions are written as the `Captioning` task's validation writes them: the task's
`generation` settings (default greedy up to the decoder's max_positions - 1 new tokens), each
row cut at its first EOS and decoded with the datamodule's tokenizer; exact match compares
lower-cased, whitespace-collapsed text (`normalize_caption`). Over the same shards the figures
equal the task's `val/bleu_4`, `val/rouge_l`, `val/cider_d` and `val/exact_match`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multimodal.data.shards_datamodules import ImageTextDataModule
from multimodal.eval.caption_metrics import bleu_caveats, caption_metrics, cider_d_scores
from multimodal.eval.evaluate import attention_or_note, images_by_key, pixels_by_key, to_display
from multimodal.eval.generation_eval import (
    PREDICTIONS_FILE,
    LoadedRun,
    autocast,
    best_and_worst,
    check_counts,
    common_parser,
    fail,
    load_run,
    progress_bar,
    run_meta,
    shard_loader,
    write_jsonl,
)
from multimodal.eval.report import (
    Marked,
    Report,
    Section,
    Table,
    flatten_metrics,
    format_value,
    table_section,
    write_report,
)
from multimodal.tasks.captioning import Captioning, cut_at, normalize_caption
from text.generation import GenerationConfig

PROG = "multimodal caption-eval"
METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "exact_match")
DEFINITIONS = {
    "bleu_n": "corpus BLEU-n: brevity penalty x geometric mean of the clipped 1..n-gram "
    "precisions against all references of each image (no smoothing)",
    "rouge_l": "ROUGE-L F (beta 1.2) of the longest common subsequence, best precision and best "
    "recall over the references, averaged over images",
    "cider_d": "CIDEr-D: tf-idf weighted 1..4-gram cosine similarity with each reference, "
    "clipped and length-penalised, x10, averaged over references and images",
    "exact_match": "share of images whose caption, lower-cased with whitespace collapsed, "
    "equals one of their references",
    "images": "images captioned (each image of the shards once)",
}


@dataclass
class CaptionRecord:
    """One image: its sample key, the caption written and the reference captions."""

    key: str
    generated: str
    references: list[str]


def parser() -> argparse.ArgumentParser:
    result = common_parser(
        PROG,
        "Write a caption for every image of the shards with a captioning checkpoint and score "
        "them against every reference caption: BLEU-1..4, ROUGE-L, CIDEr-D and exact match, "
        "written to DIR/metrics.json, summary.md, report.html and predictions.jsonl.",
        "reports/caption",
    )
    result.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="caption length limit in tokens (default: the task's generation settings)",
    )
    result.add_argument(
        "--num-beams",
        type=int,
        metavar="N",
        help="beam search with N beams; 1: greedy (default: the task's generation settings)",
    )
    result.add_argument(
        "--attention",
        action="store_true",
        help="add the attention of the best and worst examples: the rollout of the image tower "
        "and each generated token's cross-attention (models with a vision.ViT image tower)",
    )
    return result


def generation_config(
    task: Captioning, max_new_tokens: int | None = None, num_beams: int | None = None
) -> GenerationConfig:
    """The generation settings of the task's validation (`Captioner.generate`'s default when it
    has none), with the given overrides."""
    config = task.generation or GenerationConfig(
        max_new_tokens=task.model.decoder.config.max_positions - 1
    )
    if max_new_tokens is not None:
        config = dataclasses.replace(config, max_new_tokens=max_new_tokens)
    if num_beams is not None:
        strategy = "beam" if num_beams > 1 else "greedy"
        config = dataclasses.replace(config, strategy=strategy, num_beams=num_beams)
    if config.num_return_sequences != 1:
        raise ValueError(
            f"the task's generation returns {config.num_return_sequences} sequences per image: "
            "caption-eval scores one caption per image"
        )
    return config


def describe_generation(config: GenerationConfig) -> str:
    """ "greedy, max_new_tokens=15" or "beam (4 beams, length_penalty=1.0), ..."."""
    if config.strategy == "beam":
        strategy = f"beam ({config.num_beams} beams, length_penalty={config.length_penalty})"
    elif config.strategy == "sample":
        strategy = (
            f"sample (temperature={config.temperature}, top_k={config.top_k}, top_p={config.top_p})"
        )
    else:
        strategy = config.strategy
    text = f"{strategy}, max_new_tokens={config.max_new_tokens}"
    if config.repetition_penalty != 1.0:
        text += f", repetition_penalty={config.repetition_penalty}"
    return text


@torch.no_grad()
def write_captions(
    run: LoadedRun,
    loader: Any,
    generation: GenerationConfig,
    *,
    device: str,
    precision: str,
    progress: bool = True,
) -> list[CaptionRecord]:
    """A caption for every image of the loader's batches, with its key and references."""
    model = run.task.model
    tokenizer = run.data.tokenizer
    eos_id = model.decoder.config.eos_id
    records: list[CaptionRecord] = []
    for batch in progress_bar(loader, "captioning", progress):
        with autocast(device, precision):
            sequences = model.generate(batch["images"].to(device), generation).sequences
        captions = [tokenizer.decode(cut_at(row, eos_id)) for row in sequences.cpu()]
        for key, caption, references in zip(
            batch["keys"], captions, batch["references"], strict=True
        ):
            records.append(CaptionRecord(key, caption, list(references)))
    return records


def is_exact(record: CaptionRecord) -> bool:
    """The caption equals one of the references (lower-cased, whitespace collapsed)."""
    return normalize_caption(record.generated) in {normalize_caption(r) for r in record.references}


def score_captions(records: Sequence[CaptionRecord]) -> tuple[dict[str, Any], list[float]]:
    """The corpus metrics (`METRICS` and the image count) and each image's CIDEr-D."""
    if not records:
        raise ValueError("the shards hold no image with a caption to evaluate")
    candidates = [r.generated for r in records]
    references = [r.references for r in records]
    corpus = caption_metrics(candidates, references)
    corpus["exact_match"] = sum(is_exact(r) for r in records) / len(records)  # as validation's
    metrics: dict[str, Any] = {name: corpus[name] for name in METRICS}
    metrics["images"] = len(records)
    return metrics, cider_d_scores(candidates, references)


def caveats(captions: Sequence[str]) -> dict[str, str]:
    """Report explanations: a warning beside each BLEU-n that is 0 by construction."""
    return {f"caption/{name}": f"⚠ {why}" for name, why in bleu_caveats(captions).items()}


def definitions_section() -> Section:
    """One line per metric saying what it is."""
    return Section(
        "Metric definitions",
        [Table(["metric", "definition"], [[k, v] for k, v in DEFINITIONS.items()])],
    )


def example_sections(
    records: Sequence[CaptionRecord],
    scores: Sequence[float],
    images: dict[str, Any],
    best: Sequence[int],
    worst: Sequence[int],
) -> list[Section]:
    """Tables of the best and the worst captions: image, CIDEr-D, the caption (marked ✓ on an
    exact match) and the references."""
    sections = []
    for title, indices in (
        ("Best captions by CIDEr-D", best),
        ("Worst captions by CIDEr-D", worst),
    ):
        if not indices:
            continue
        rows = [
            {
                "image": images[records[i].key],
                "key": records[i].key,
                "CIDEr-D": scores[i],
                "generated": Marked(records[i].generated, is_exact(records[i])),
                "references": list(records[i].references),
            }
            for i in indices
        ]
        text = "Per-image CIDEr-D (document frequencies of the whole set); ✓: exact match."
        sections.append(table_section(title, rows, text=text))
    return sections


def caption_eval_main(argv: Sequence[str]) -> int:
    """`multimodal caption-eval ...`; returns the exit status."""
    cli = parser()
    args = cli.parse_args(list(argv))
    check_counts(cli, args)
    for flag in ("max_new_tokens", "num_beams"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            cli.error(f"--{flag.replace('_', '-')}={value} must be >= 1")
    try:
        run = load_run(
            args.checkpoint,
            args.config,
            task_class=Captioning,
            data_class=ImageTextDataModule,
            command="caption-eval",
            device=args.device,
        )
        generation = generation_config(run.task, args.max_new_tokens, args.num_beams)

        def loader() -> Any:
            return shard_loader(
                args.data,
                run.data.map_sample("val"),
                run.data.collate(),
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                one_item_per_sample=True,
            )

        records = write_captions(
            run,
            loader(),
            generation,
            device=args.device,
            precision=args.precision,
            progress=not args.no_progress,
        )
        metrics, scores = score_captions(records)
    except (ValueError, FileNotFoundError) as error:
        return fail(PROG, error)
    best, worst = best_and_worst(scores, args.examples)
    shown = [records[i].key for i in (*best, *worst)]
    transform = run.data.transform
    attention = []
    if args.attention:  # the model's inputs of the examples, read once for both sections
        pixels = pixels_by_key(loader(), list(dict.fromkeys(shown)))
        images = {k: to_display(v, transform.mean, transform.std) for k, v in pixels.items()}
        attention.append(
            attention_or_note(
                run.task.model,
                pixels,
                transform.mean,
                transform.std,
                tokenizer=run.data.tokenizer,
                title="Attention of the best and worst examples",
            )
        )
    else:
        images = images_by_key(loader(), shown, transform.mean, transform.std)
    report = Report(
        title="Captioning",
        metrics={"caption": metrics},
        sections=[
            definitions_section(),
            *example_sections(records, scores, images, best, worst),
            *attention,
        ],
        meta=run_meta(run, args, generation=describe_generation(generation)),
        explanations=caveats([r.generated for r in records]),
    )
    paths = write_report(report, args.out, meta_in_json=True)
    write_jsonl(
        (
            {
                "key": r.key,
                "generated": r.generated,
                "references": r.references,
                "cider_d": score,
                "exact_match": is_exact(r),
            }
            for r, score in zip(records, scores, strict=True)
        ),
        paths["html"].parent / PREDICTIONS_FILE,
    )
    for name, value in flatten_metrics(report.metrics):
        print(f"{name:<24} {format_value(value)}")
    print(f"report: {paths['html']}")
    return 0

"""`multimodal vqa-eval`: a VQA checkpoint answers every question of the shards (all the
questions of each image) and is scored with the VQA accuracy overall, by question type and by
answer type; written to metrics.json (with the meta data), summary.md, report.html (accuracy
charts and example questions with their images) and predictions.jsonl (one line a question).

The predicted answer is the answer vocabulary's entry of the classifier's top logit, as the
`VisualQuestionAnswering` task's validation takes it; its score is `vqa_accuracy`
(min(#annotators whose answer equals it / 3, 1) after `normalize_answer`), so the overall
accuracy equals the task's `val/acc` over the same shards.

Question and answer types are those of the data (`question_type` and `answer_type` of each
`json["vqa"]` pair, as in the VQA annotations) where it has them, else derived as the VQA
annotations define them: the question type is the longest of the 64 official question-type
prefixes (QuestionTypes/mscoco_question_types.txt of the VQA API) that the question starts with
("none of the above" when none does); the answer type is the type most of the annotators'
answers have (ties: the first given), an answer being "yes/no" when it normalises to yes or
no, "number" when it normalises to a number, else "other".
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from multimodal.data.answers import normalize_answer
from multimodal.data.shards_datamodules import VQACollator, VQADataModule, VQASample
from multimodal.eval.evaluate import images_by_key
from multimodal.eval.generation_eval import (
    PREDICTIONS_FILE,
    LoadedRun,
    autocast,
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
    per_class_section,
    table_section,
    write_report,
)
from multimodal.eval.vqa_metrics import vqa_accuracy, vqa_accuracy_official
from multimodal.tasks.vqa import VisualQuestionAnswering

PROG = "multimodal vqa-eval"
YES_NO, NUMBER, OTHER = "yes/no", "number", "other"
NO_QUESTION_TYPE = "none of the above"
# QuestionTypes/mscoco_question_types.txt of the VQA API (GT-Vision-Lab/VQA), in its order
QUESTION_TYPES = (
    "how many", "is the", "what", "what color is the", "what is the", "is this", "is this a",
    "what is", "are the", "what kind of", "is there a", "what type of", "is it", "what are the",
    "where is the", "is there", "does the", "what color are the", "are these", "are there",
    "which", "is", "what is the man", "is the man", "are", "how", "does this", "what is on the",
    "what does the", "how many people are", "what is in the", "what is this", "do", "what are",
    "are they", "what time", "what sport is", "are there any", "is he", "what color is", "why",
    "where are the", "what color", "who is", "what animal is", "is the woman", "is this an",
    "do you", "how many people are in", "what room is", "has", "is this person",
    "what is the woman", "can you", "why is the", "is the person", "what is the color of the",
    "what is the person", "could", "was", "is that a", "what number is", "what is the name",
    "what brand",
)  # fmt: skip
_WORD = re.compile(r"[a-z0-9']+")
_NUMBER = re.compile(r"\d+(\.\d+)?")
DEFINITIONS = {
    "accuracy": "VQA accuracy: min(#annotators whose answer equals the predicted one / 3, 1), "
    "answers compared after the official normalisation, averaged over questions",
    "accuracy_leave_one_out": "the official script's score: the accuracy above averaged over "
    "the annotator subsets leaving one out (n/a when a question has fewer than 2 answers)",
    "by_question_type": "accuracy over the questions of each question type (the data's, else "
    "the longest official question-type prefix)",
    "by_answer_type": "accuracy over the questions of each answer type: yes/no, number, other "
    "(the data's, else the type most annotators' answers have)",
    "questions": "questions answered (every question of every image of the shards once)",
}


def question_type(question: str) -> str:
    """The longest official question-type prefix of the question's words."""
    words = _WORD.findall(question.lower())
    found = [kind for kind in QUESTION_TYPES if words[: len(kind.split())] == kind.split()]
    return max(found, key=lambda kind: len(kind.split()), default=NO_QUESTION_TYPE)


def answer_kind(answer: str) -> str:
    """yes/no, number or other, for one answer (after `normalize_answer`)."""
    normalized = normalize_answer(answer)
    if normalized in ("yes", "no"):
        return YES_NO
    return NUMBER if _NUMBER.fullmatch(normalized) else OTHER


def answer_type(answers: Sequence[str]) -> str:
    """The answer type most of the annotators' answers have (ties: the first given)."""
    counts = Counter(answer_kind(a) for a in answers)
    return max(counts, key=counts.__getitem__, default=OTHER)


def _given_type(pair: Any, field: str) -> str | None:
    value = pair.get(field) if isinstance(pair, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


@dataclass
class TypedVQASample:
    """The datamodule's `VQASample` items with the question's text and the pair's
    `question_type` / `answer_type` from the json (None where it has none)."""

    inner: VQASample

    def __call__(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        items = self.inner(sample)
        pairs = sample["json"]["vqa"]  # VQASample checked it
        pairs = pairs if isinstance(pairs, list) else [pairs]
        for item in items:
            pair = pairs[int(item["key"].rsplit("/", 1)[1])]
            item["question"] = pair["question"].strip()
            item["question_type"] = _given_type(pair, "question_type")
            item["answer_type"] = _given_type(pair, "answer_type")
        return items


@dataclass
class TypedVQACollator:
    """The datamodule's `VQACollator` batch plus `questions`, `question_types` and
    `answer_types` lists."""

    inner: VQACollator

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(items)
        for field in ("question", "question_type", "answer_type"):
            batch[f"{field}s"] = [item[field] for item in items]
        return batch


@dataclass
class AnswerRecord:
    """One question: its key (sample key / pair index), text, types, the predicted answer,
    the annotators' answers and the VQA score of the prediction."""

    key: str
    question: str
    question_type: str
    answer_type: str
    predicted: str
    answers: list[str]
    score: float


def parser() -> argparse.ArgumentParser:
    return common_parser(
        PROG,
        "Answer every question of the shards with a VQA checkpoint: VQA accuracy overall, by "
        "question type and by answer type, with example questions, written to "
        "DIR/metrics.json, summary.md, report.html and predictions.jsonl.",
        "reports/vqa",
    )


def answer_vocabulary(run: LoadedRun) -> list[str]:
    """The datamodule's answer vocabulary, checked against the model's classifier."""
    try:
        vocab = run.data.answer_vocab
    except ValueError as error:
        raise ValueError(
            f"the answer vocabulary of config {str(run.config)!r} is built from its training "
            f"shards ({error}); give the config an answer_vocab list"
        ) from None
    if len(vocab) != run.task.model.num_answers:
        raise ValueError(
            f"config {str(run.config)!r} has {len(vocab)} answers but the model's classifier "
            f"has {run.task.model.num_answers}: pass the checkpoint's own fit config"
        )
    return vocab


@torch.no_grad()
def answer_questions(
    run: LoadedRun,
    loader: Any,
    vocab: Sequence[str],
    *,
    device: str,
    precision: str,
    progress: bool = True,
) -> list[AnswerRecord]:
    """The classifier's answer to every question of the loader's batches, with its score."""
    model = run.task.model
    records: list[AnswerRecord] = []
    for batch in progress_bar(loader, "answering", progress):
        with autocast(device, precision):
            out = model(
                batch["images"].to(device),
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
            )
        predicted = out.logits.argmax(dim=-1).tolist()
        for i, key in enumerate(batch["keys"]):
            answers = list(batch["answers"][i])
            question = batch["questions"][i]
            records.append(
                AnswerRecord(
                    key=key,
                    question=question,
                    question_type=batch["question_types"][i] or question_type(question),
                    answer_type=batch["answer_types"][i] or answer_type(answers),
                    predicted=vocab[predicted[i]],
                    answers=answers,
                    score=vqa_accuracy(vocab[predicted[i]], answers),
                )
            )
    return records


def _grouped(records: Sequence[AnswerRecord], field: str) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        groups[getattr(record, field)].append(record.score)
    return dict(sorted(groups.items()))


def score_answers(records: Sequence[AnswerRecord]) -> dict[str, Any]:
    """Accuracy overall, leave-one-out, by question type and by answer type, and counts."""
    if not records:
        raise ValueError("the shards hold no question to evaluate (json 'vqa' pairs)")
    metrics: dict[str, Any] = {
        "accuracy": sum(r.score for r in records) / len(records),
        "accuracy_leave_one_out": None,
        "questions": len(records),
        "images": len({r.key.rsplit("/", 1)[0] for r in records}),
    }
    if all(len(r.answers) >= 2 for r in records):
        loo = [vqa_accuracy_official(r.predicted, r.answers) for r in records]
        metrics["accuracy_leave_one_out"] = sum(loo) / len(loo)
    for field in ("answer_type", "question_type"):
        groups = _grouped(records, field)
        metrics[f"by_{field}"] = {k: sum(v) / len(v) for k, v in groups.items()}
        metrics[f"questions_by_{field}"] = {k: len(v) for k, v in groups.items()}
    return metrics


def definitions_section() -> Section:
    """One line per metric saying what it is."""
    return Section(
        "Metric definitions",
        [Table(["metric", "definition"], [[k, v] for k, v in DEFINITIONS.items()])],
    )


def type_sections(metrics: dict[str, Any]) -> list[Section]:
    """Bar charts and tables of the accuracy by answer type and by question type."""
    sections = []
    for field, title in (
        ("answer_type", "Accuracy by answer type"),
        ("question_type", "Accuracy by question type"),
    ):
        accuracy = metrics[f"by_{field}"]
        counts = metrics[f"questions_by_{field}"]
        names = list(accuracy)
        sections.append(
            per_class_section(
                names,
                [accuracy[n] for n in names],
                support=[counts[n] for n in names],
                title=title,
                label=field.replace("_", " "),
            )
        )
    return sections


def pick_examples(records: Sequence[AnswerRecord], n: int) -> list[int]:
    """Up to n questions: the wrong ones (lowest score first) for half, the right ones (full
    score) for the rest, each in data order; wrong first."""
    wrong = sorted(
        (i for i, r in enumerate(records) if r.score < 1), key=lambda i: records[i].score
    )
    right = [i for i, r in enumerate(records) if r.score >= 1]
    n_wrong = min(len(wrong), max(n - len(right), (n + 1) // 2))
    return wrong[:n_wrong] + right[: n - n_wrong]


def _answer_counts(answers: Sequence[str]) -> list[str]:
    counts = Counter(normalize_answer(a) for a in answers)
    return [f"{answer} ×{count}" for answer, count in counts.most_common()]


def examples_section(
    records: Sequence[AnswerRecord], indices: Sequence[int], images: dict[str, Any]
) -> Section:
    """Image, question, types, the prediction (✓ full score, ✗ otherwise), its score and the
    annotators' answers with their counts."""
    rows = [
        {
            "image": images[records[i].key],
            "key": records[i].key,
            "question": records[i].question,
            "question type": records[i].question_type,
            "answer type": records[i].answer_type,
            "predicted": Marked(records[i].predicted, records[i].score >= 1),
            "score": records[i].score,
            "answers": _answer_counts(records[i].answers),
        }
        for i in indices
    ]
    text = "✓: full VQA credit (>= 3 annotators gave the answer), ✗: less; wrong answers first."
    return table_section("Examples", rows, text=text)


def vqa_eval_main(argv: Sequence[str]) -> int:
    """`multimodal vqa-eval ...`; returns the exit status."""
    cli = parser()
    args = cli.parse_args(list(argv))
    check_counts(cli, args)
    try:
        run = load_run(
            args.checkpoint,
            args.config,
            task_class=VisualQuestionAnswering,
            data_class=VQADataModule,
            command="vqa-eval",
            device=args.device,
        )
        vocab = answer_vocabulary(run)

        def loader() -> Any:
            return shard_loader(
                args.data,
                TypedVQASample(run.data.map_sample("val")),
                TypedVQACollator(run.data.collate()),
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                one_item_per_sample=False,
            )

        records = answer_questions(
            run,
            loader(),
            vocab,
            device=args.device,
            precision=args.precision,
            progress=not args.no_progress,
        )
        metrics = score_answers(records)
    except (ValueError, FileNotFoundError) as error:
        return fail(PROG, error)
    shown = pick_examples(records, args.examples)
    transform = run.data.transform
    images = images_by_key(loader(), [records[i].key for i in shown], transform.mean, transform.std)
    sections = [definitions_section(), *type_sections(metrics)]
    if shown:
        sections.append(examples_section(records, shown, images))
    report = Report(
        title="Visual question answering",
        metrics={"vqa": metrics},
        sections=sections,
        meta=run_meta(run, args, answers=f"{len(vocab)} (the classifier's vocabulary)"),
    )
    paths = write_report(report, args.out, meta_in_json=True)
    write_jsonl(
        (
            {
                "key": r.key,
                "question": r.question,
                "question_type": r.question_type,
                "answer_type": r.answer_type,
                "predicted": r.predicted,
                "answers": r.answers,
                "score": r.score,
            }
            for r in records
        ),
        paths["html"].parent / PREDICTIONS_FILE,
    )
    for name, value in flatten_metrics(report.metrics):
        print(f"{name:<40} {format_value(value)}")
    print(f"report: {paths['html']}")
    return 0

"""The Python inference API: `multimodal.load(checkpoint_or_name)` -> a `Predictor` that embeds,
classifies, captions, answers or generates with a trained model, in eval mode, with the image
transform and tokenizer it was trained with.

    import multimodal
    model = multimodal.load("runs/clip/lightning_logs/version_0/checkpoints/best.ckpt")
    model.abilities                      # ('embed_images', 'embed_texts', 'classify')
    model.classify(["photo.png"], "digits").names

Sources: a `multimodal fit` checkpoint (rebuilt from its run's config.yaml or `config=`, with
`multimodal.eval.loading.load_run`), an int8 file of `multimodal quantize`
(`multimodal.eval.loading.load_model`) and an open_clip architecture with `pretrained=` a local
state dict or a pretrained tag (`multimodal.eval.loading.load_open_clip`). What a model can do
follows from its class: a CLIP-style model (ours, open_clip, a Captioner with a contrastive head)
embeds and classifies zero-shot, a `Captioner` captions, a `VQAModel` answers, a `DecoderLM`
without cross-attention or an `EncoderDecoderLM` generates text; asking for anything else is a
ValueError naming what the model can do. Zero-shot classification is the evaluation's own code
(`multimodal.eval.zeroshot`), so `classify` predicts what `multimodal zeroshot` scores.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from multimodal.eval import class_names as names
from multimodal.eval import zeroshot
from multimodal.eval.loading import LoadedModel, load_model, load_open_clip, load_run
from multimodal.models import Captioner, ClipLike, VQAModel
from text import DecoderLM, EncoderDecoderLM, GenerationConfig
from text.generation import generate as generate_tokens

ABILITIES = ("embed_images", "embed_texts", "classify", "caption", "answer", "generate")
WHAT_IT_NEEDS = {
    "embed_images": "a CLIP-style model (CLIP, open_clip, a Captioner with a contrastive head)",
    "embed_texts": "a CLIP-style model (CLIP, open_clip, a Captioner with a contrastive head)",
    "classify": "a CLIP-style model (CLIP, open_clip, a Captioner with a contrastive head)",
    "caption": "a Captioner (multimodal.tasks.Captioning)",
    "answer": "a VQAModel (multimodal.tasks.VisualQuestionAnswering)",
    "generate": "a text language model (CausalLM's DecoderLM or Seq2SeqLM's EncoderDecoderLM)",
}
DEFAULT_TEMPLATES = ("a photo of a {}.",)  # CLIP's simplest prompt, for a plain list of names
MAX_NEW_TOKENS = 32  # `generate`'s default, cut to what the model's positions allow
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

ImageInput = Image.Image | str | os.PathLike


@dataclass
class Classification:
    """Zero-shot predictions of N images among C classes."""

    indices: Tensor  # (N,) the predicted class of each image (highest cosine similarity)
    names: list[str]  # the predicted class names
    probabilities: Tensor  # (N, C) softmax of the model's logit scale x similarities
    similarities: Tensor  # (N, C) cosine similarity of each image to each class embedding
    class_names: list[str]  # the C classes, in index order


@dataclass
class Answers:
    """VQA answers to N questions, each the best of the model's answer vocabulary."""

    answers: list[str]  # the answer to each question
    indices: Tensor  # (N,) their ids in `vocabulary`
    scores: Tensor  # (N, A) sigmoid score of every answer (the model is trained on soft scores)
    vocabulary: list[str]  # the A answers, in id order


@dataclass
class Continuation:
    """One generated sequence: its new token ids (up to, not including, EOS), their text when
    the model has a tokenizer, and its score (sum of log-probs; beam: length-penalised)."""

    ids: list[int]
    text: str | None
    score: float


class Predictor:
    """A loaded model ready for inference (eval mode, on `device`) with its image transform and
    tokenizer; built by `load`. Methods the model cannot serve raise a ValueError that names
    what it can do (`abilities`).

    Args:
        model: the plain nn.Module (CLIP, OpenCLIP, Captioner, VQAModel, DecoderLM, ...).
        description: what was loaded, for messages.
        transform: PIL image -> (3, H, W) tensor, the evaluation transform (None: no images).
        tokenizer: the tokenizer of the run (None: the data has none, e.g. synthetic ids).
        context_length: the text length the model was trained with (None: unbounded).
        answer_vocab: a VQA model's answers in id order.
        generation: a captioner's validation generation config (None: the model's default).
        device: where the model and inputs go.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        description: str,
        transform: Callable[[Any], Tensor] | None = None,
        tokenizer: Any = None,
        context_length: int | None = None,
        answer_vocab: Sequence[str] | None = None,
        generation: GenerationConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.description = description
        self.transform = transform
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.answer_vocab = None if answer_vocab is None else list(answer_vocab)
        self.generation = generation
        self._abilities = _abilities(model, transform, tokenizer, self.answer_vocab)
        if not self._abilities:
            raise ValueError(
                f"this model ({description}) has none of the abilities of the inference API "
                f"({', '.join(ABILITIES)}); it is a {type(model).__name__}"
            )

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, device: str | torch.device = "cpu") -> Predictor:
        """A CLIP-style model loaded for evaluation (`multimodal.eval.loading`)."""
        return cls(
            loaded.model,
            description=loaded.description,
            transform=loaded.transform,
            tokenizer=loaded.tokenizer,
            context_length=loaded.context_length,
            device=device,
        )

    @classmethod
    def from_run(
        cls, task: nn.Module, data: Any, description: str, device: str | torch.device = "cpu"
    ) -> Predictor:
        """The model of a `multimodal fit` task fed as its datamodule `data` feeds it."""
        from multimodal.data import VQADataModule
        from multimodal.data.text import TokenizerMixin
        from multimodal.tasks import Captioning
        from vision.transforms import ImageTransformConfig

        model = task.model
        transform = getattr(data, "transform", None)  # the shard datamodules' image transforms
        return cls(
            model,
            description=description,
            transform=transform.eval() if isinstance(transform, ImageTransformConfig) else None,
            tokenizer=data.tokenizer if isinstance(data, TokenizerMixin) else None,
            context_length=getattr(data, "context_length", None),
            answer_vocab=(
                data.answer_vocab
                if isinstance(data, VQADataModule) and isinstance(model, VQAModel)
                else None
            ),
            generation=task.generation if isinstance(task, Captioning) else None,
            device=device,
        )

    @property
    def abilities(self) -> tuple[str, ...]:
        """What this model can do, by method name."""
        return self._abilities

    def __repr__(self) -> str:
        return f"Predictor({self.description}; can: {', '.join(self.abilities)})"

    def _need(self, ability: str) -> None:
        if ability not in self._abilities:
            raise ValueError(
                f"this model ({self.description}) cannot {ability}: that needs "
                f"{WHAT_IT_NEEDS[ability]}; it can: {', '.join(self._abilities)}"
            )

    # -- images and texts ----------------------------------------------------------------------

    def _pixel_batches(
        self, images: Sequence[ImageInput], batch_size: int, progress: bool | None
    ) -> Iterator[Tensor]:
        """(b, 3, H, W) batches of the transformed images, on the device."""
        _check_batch_size(batch_size)
        images = _check_images(images)
        starts = range(0, len(images), batch_size)
        shown = len(starts) > 1 if progress is None else progress
        for start in tqdm(starts, disable=not shown, desc="images", unit="batch"):
            chunk = [_open_image(image) for image in images[start : start + batch_size]]
            yield torch.stack([self.transform(image) for image in chunk]).to(self.device)

    @torch.no_grad()
    def embed_images(
        self, images: Sequence[ImageInput], *, batch_size: int = 64, progress: bool | None = None
    ) -> Tensor:
        """(N, D) unit-norm fp32 image embeddings (on the CPU) of PIL images or image files,
        `batch_size` a forward pass (progress bar: when there is more than one batch)."""
        self._need("embed_images")
        features = [
            zeroshot.embed_images(self.model, pixels).cpu()
            for pixels in self._pixel_batches(images, batch_size, progress)
        ]
        return torch.cat(features)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
        """(N, D) unit-norm fp32 text embeddings (on the CPU); the texts are tokenized together
        (one padding width, as the zero-shot classifier does), `batch_size` a forward pass."""
        self._need("embed_texts")
        _check_batch_size(batch_size)
        texts = _check_texts(texts, "texts")
        tokens = self.tokenizer.batch_encode(texts, max_length=self.context_length)  # (N, T)
        features = []
        for start in range(0, len(texts), batch_size):
            ids = tokens.input_ids[start : start + batch_size].to(self.device)
            mask = tokens.attention_mask[start : start + batch_size].to(self.device)
            features.append(zeroshot.embed_texts(self.model, ids, mask).cpu())
        return torch.cat(features)

    @torch.no_grad()
    def classify(
        self,
        images: Sequence[ImageInput],
        class_names: str | Sequence[str],
        templates: str | Sequence[names.Template] | None = None,
        *,
        batch_size: int = 64,
        text_batch_size: int = 256,
        progress: bool | None = None,
    ) -> Classification:
        """Zero-shot classification, as `multimodal zeroshot` does it: each class embedding is
        the normalised mean of its prompts' embeddings (`zeroshot_classifier`), each image goes
        to the class of highest cosine similarity.

        Args:
            images: PIL images or image files.
            class_names: the class names in index order, or a built-in list
                (`multimodal.eval.class_names.BUILTINS`, e.g. "digits") or a .txt/.json file.
            templates: prompts with `{}` for the class name (or callables name -> prompt), a
                built-in set or a file; default: the built-in set of the same name as
                `class_names` when it has one, else "a photo of a {}.".
            batch_size: images a forward pass; text_batch_size: prompts a forward pass.
        """
        self._need("classify")
        classes, template_list = _classes_and_templates(class_names, templates)
        classifier = zeroshot.zeroshot_classifier(
            self.model,
            self.tokenizer,
            names.render_prompts(classes, template_list),
            context_length=self.context_length or 77,
            batch_size=text_batch_size,
            device=self.device,
        ).cpu()  # (C, D)
        features = self.embed_images(images, batch_size=batch_size, progress=progress)
        similarities = zeroshot.zeroshot_logits(features, classifier)  # (N, C)
        scale = self.model.scale().detach().float().cpu()
        indices = similarities.argmax(dim=1)
        return Classification(
            indices=indices,
            names=[classes[i] for i in indices.tolist()],
            probabilities=(scale * similarities).softmax(dim=1),
            similarities=similarities,
            class_names=list(classes),
        )

    # -- generation ----------------------------------------------------------------------------

    def _generation_config(
        self, base: GenerationConfig | None, default_max_new_tokens: int, options: dict[str, Any]
    ) -> GenerationConfig:
        """`base` (or a config with `default_max_new_tokens`) with `options` replaced;
        ValueError naming the options GenerationConfig has not."""
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(
                f"unknown generation option(s) {unknown}: GenerationConfig has {sorted(fields)}"
            )
        base = base or GenerationConfig(max_new_tokens=default_max_new_tokens)
        return dataclasses.replace(base, **options)

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[ImageInput],
        *,
        batch_size: int = 64,
        progress: bool | None = None,
        generator: torch.Generator | None = None,
        **generation: Any,
    ) -> list[str]:
        """Captions of PIL images or image files, written by `Captioner.generate` and decoded
        with the run's tokenizer (cut at EOS). `generation` sets `GenerationConfig` fields
        (strategy="beam", num_beams=4, max_new_tokens=...) over the run's validation config
        (default: greedy up to the decoder's positions); with num_return_sequences=n the
        captions of image i are at i * n ... i * n + n - 1."""
        self._need("caption")
        decoder = self.model.decoder.config
        config = (
            self._generation_config(self.generation, decoder.max_positions - 1, generation)
            if generation
            else self.generation
        )
        captions = []
        for pixels in self._pixel_batches(images, batch_size, progress):
            out = self.model.generate(pixels, config, generator=generator)
            captions += [self._decode(row, decoder.eos_id) for row in out.sequences.cpu()]
        return captions

    @torch.no_grad()
    def answer(
        self,
        images: Sequence[ImageInput],
        questions: str | Sequence[str],
        *,
        batch_size: int = 64,
        progress: bool | None = None,
    ) -> Answers:
        """The answer to one question per image (a single str asks every image the same),
        tokenized as the VQA datamodule does (padded to the context length): the best answer of
        the model's answer classifier over the run's answer vocabulary."""
        self._need("answer")
        images = _check_images(images)
        if isinstance(questions, str):
            questions = [questions] * len(images)
        questions = _check_texts(questions, "questions")
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions for {len(images)} images: one each")
        tokens = self.tokenizer.batch_encode(
            questions, max_length=self.context_length, padding="max_length"
        )  # (N, context_length)
        scores = []
        for start, pixels in zip(
            range(0, len(images), batch_size),
            self._pixel_batches(images, batch_size, progress),
            strict=True,
        ):
            ids = tokens.input_ids[start : start + batch_size].to(self.device)
            mask = tokens.attention_mask[start : start + batch_size].to(self.device)
            scores.append(self.model(pixels, ids, mask).logits.float().sigmoid().cpu())  # (b, A)
        all_scores = torch.cat(scores)
        indices = all_scores.argmax(dim=1)
        return Answers(
            answers=[self.answer_vocab[i] for i in indices.tolist()],
            indices=indices,
            scores=all_scores,
            vocabulary=list(self.answer_vocab),
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        generator: torch.Generator | None = None,
        **generation: Any,
    ) -> list[Continuation]:
        """Continue a text prompt (tokenized without special tokens for a decoder, as a source
        with them for an encoder-decoder) or a list of token ids, with `text.generation`:
        one `Continuation` per returned sequence (beam search: best first). `generation` sets
        `GenerationConfig` fields; max_new_tokens defaults to 32 or what the positions allow."""
        self._need("generate")
        ids = self._prompt_ids(prompt)
        config = self.model.config
        fed = 1 if isinstance(self.model, EncoderDecoderLM) else len(ids)
        room = config.max_positions - fed + 1
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model reads at most {config.max_positions}"
            )
        options = {"max_new_tokens": min(MAX_NEW_TOKENS, room), **generation}
        out = generate_tokens(
            self.model,
            torch.tensor([ids], device=self.device),
            config=self._generation_config(None, options["max_new_tokens"], options),
            generator=generator,
        )
        eos_id = generation.get("eos_id", config.eos_id)
        return [
            Continuation(
                ids=_cut_at(row, eos_id),
                text=self._decode(row, eos_id) if self.tokenizer is not None else None,
                score=float(score),
            )
            for row, score in zip(out.sequences.cpu(), out.scores.cpu(), strict=True)
        ]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        vocab_size = self.model.config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"this model ({self.description}) was trained on data without a "
                    "tokenizer: pass the prompt as a list of token ids"
                )
            special = isinstance(self.model, EncoderDecoderLM)
            ids = self.tokenizer.encode(prompt, add_special_tokens=special)
        elif isinstance(prompt, Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: expected a text or at least one token id")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
        bad += [i for i in ids if isinstance(i, int) and not 0 <= i < vocab_size]
        if bad:
            raise ValueError(
                f"prompt ids must be ints in [0, {vocab_size}) (the model's vocabulary); "
                f"got {bad[0]!r}"
            )
        return ids

    def _decode(self, row: Tensor, eos_id: int | None) -> str:
        return self.tokenizer.decode(_cut_at(row, eos_id))


def _cut_at(row: Tensor, eos_id: int | None) -> list[int]:
    from multimodal.tasks.captioning import cut_at  # what validation captions are cut with

    return cut_at(row, eos_id)


def _abilities(
    model: nn.Module, transform: Any, tokenizer: Any, answer_vocab: list[str] | None
) -> tuple[str, ...]:
    """What `model` can do with the inputs it has (a transform for images, a tokenizer)."""
    found = set()
    contrastive = isinstance(model, ClipLike) or (
        isinstance(model, Captioner) and model.contrastive
    )
    if contrastive and transform is not None:
        found.add("embed_images")
    if contrastive and tokenizer is not None:
        found.add("embed_texts")
    if contrastive and transform is not None and tokenizer is not None:
        found.add("classify")
    if isinstance(model, Captioner) and transform is not None and tokenizer is not None:
        found.add("caption")
    if (
        isinstance(model, VQAModel)
        and transform is not None
        and tokenizer is not None
        and answer_vocab is not None
    ):
        found.add("answer")
    if isinstance(model, EncoderDecoderLM) or (
        isinstance(model, DecoderLM) and not model.config.transformer.cross_attention
    ):
        found.add("generate")
    return tuple(a for a in ABILITIES if a in found)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")


def _check_images(images: Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (Image.Image, str, os.PathLike)):
        raise TypeError("images is a list of PIL images or paths; got one, wrap it in [ ]")
    images = list(images)
    if not images:
        raise ValueError("no images: expected a non-empty list of PIL images or paths")
    return images


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{what} is a list of str; got one str, wrap it in [ ]")
    texts = list(texts)
    if not texts:
        raise ValueError(f"no {what}: expected a non-empty list of str")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"{what} must be str, got {type(text).__name__}: {text!r}")
    return texts


def _open_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image, as the shard reader decodes one (`convert("RGB")`)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    with Image.open(path) as opened:
        return opened.convert("RGB")


def _classes_and_templates(
    class_names: str | Sequence[str], templates: str | Sequence[names.Template] | None
) -> tuple[tuple[str, ...], tuple[names.Template, ...]]:
    """The class names and templates `classify` was given, built-in names and files read."""
    if isinstance(class_names, (str, os.PathLike)):
        given = str(class_names)
        classes = names.class_names(given)
        if templates is None and (given in names.BUILTIN_TEMPLATES or given.endswith(".json")):
            templates = given  # the list's own templates
    else:
        classes = tuple(class_names)
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise ValueError("class_names must be non-empty strings, one per class")
    if templates is None:
        return classes, DEFAULT_TEMPLATES
    if isinstance(templates, (str, os.PathLike)):
        return classes, names.templates(templates)
    return classes, tuple(templates)


def load(
    checkpoint_or_name: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    pretrained: str | os.PathLike | None = None,
) -> Predictor:
    """A trained model ready for inference (eval mode, on `device`).

    Args:
        checkpoint_or_name: a `multimodal fit` checkpoint (.ckpt), an int8 file of
            `multimodal quantize`, or with `pretrained` an open_clip architecture name
            (e.g. "ViT-B-32").
        config: the fit config of a checkpoint (default: the config.yaml saved with its run).
        device: "cpu", "cuda", "cuda:1", ... (an int8 file runs on the CPU only).
        pretrained: the open_clip weights: a local state dict file or a pretrained tag
            (e.g. "laion2b_s34b_b79k", downloaded by open_clip).
    """
    if pretrained is not None:
        if config is not None:
            raise ValueError("config= is for checkpoints of `multimodal fit`, not open_clip models")
        weights = Path(pretrained)
        if weights.is_file():
            loaded = load_open_clip(str(checkpoint_or_name), checkpoint=weights)
        elif weights.suffix in WEIGHT_SUFFIXES or len(weights.parts) > 1:
            raise FileNotFoundError(f"open_clip weights {str(pretrained)!r} do not exist")
        else:
            loaded = load_open_clip(str(checkpoint_or_name), pretrained=str(pretrained))
        return Predictor.from_loaded(loaded, device)
    path = Path(checkpoint_or_name)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(checkpoint_or_name)!r} does not exist (for an open_clip "
            "architecture, pass pretrained=TAG or a local weights file)"
        )
    from multimodal.checkpoint_check import check_torch_file
    from multimodal.export.quantize import is_quantized_file

    check_torch_file(path)  # a text file or random bytes: say so before torch reads it
    if is_quantized_file(path):
        return Predictor.from_loaded(load_model(path, config=config, device=device), device)
    task, data, config = load_run(path, config)
    description = f"{type(task.model).__name__} from {path}"
    return Predictor.from_run(task, data, description, device)

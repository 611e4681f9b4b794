"""Zero-shot classification: the classifier against a hand computation and per-prompt brute
force, the metrics against brute force on random logits, evaluation with fake models whose
embeddings are known, and the class-name / template registry."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassConfusionMatrix

from multimodal.data.demo import HELD_OUT_TEMPLATES, render_captions
from multimodal.eval.class_names import (
    CIFAR_TEMPLATES,
    class_names,
    render_prompts,
    templates,
)
from multimodal.eval.zeroshot import (
    ZeroShotMetrics,
    zeroshot_classifier,
    zeroshot_evaluate,
    zeroshot_logits,
)
from text.tokenizer import Tokenizer


class WordTokenizer(Tokenizer):
    """Whitespace words (punctuation dropped) -> ids from a fixed vocabulary; pad 0, unknown 1."""

    pad_id = 0
    unk_id = 1

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in self.words(t)})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}

    @staticmethod
    def words(text: str) -> list[str]:
        return re.sub(r"[^\w\s]", " ", text.lower()).split()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 2

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.vocab.get(w, self.unk_id) for w in self.words(t)] for t in texts]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def save(self, directory) -> None:
        raise NotImplementedError


class BagModel(nn.Module):
    """Text embedding = sum of its tokens' vectors (padding masked out); image embedding = the
    first `dim` pixels of the flattened image. Records the training flag seen by each call."""

    def __init__(self, token_vectors: Tensor) -> None:
        super().__init__()
        self.token_vectors = nn.Parameter(token_vectors)  # (V, D)
        self.dropout = nn.Dropout(0.5)  # a submodule whose mode must be restored
        self.modes_seen: list[bool] = []
        self.autocast_seen: list[torch.dtype | None] = []

    def record(self) -> None:
        self.modes_seen.append(self.training)
        autocast = torch.is_autocast_enabled("cpu")
        self.autocast_seen.append(torch.get_autocast_dtype("cpu") if autocast else None)

    def encode_image(self, images: Tensor, *, normalize: bool = True) -> Tensor:
        self.record()
        features = images.flatten(1)[:, : self.token_vectors.shape[1]]  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True
    ) -> Tensor:
        self.record()
        vectors = self.token_vectors[input_ids] * attention_mask.unsqueeze(-1)  # (B, T, D)
        features = vectors.sum(dim=1)  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features


def one_hot_model(tokenizer: WordTokenizer, names: Sequence[str]) -> BagModel:
    """Perfect embeddings: the words of class c's name -> e_c, all other words -> 0."""
    vectors = torch.zeros(tokenizer.vocab_size, len(names))
    for c, name in enumerate(names):
        for word in tokenizer.words(name):
            vectors[tokenizer.vocab[word], c] = 1.0
    return BagModel(vectors)


def images_of(labels: Tensor, num_classes: int) -> Tensor:
    """(N, 3, 4, 4) images whose first pixels are the one-hot vector of the label."""
    images = torch.zeros(len(labels), 3 * 4 * 4)
    images[:, :num_classes] = F.one_hot(labels, num_classes).float()
    return images.view(-1, 3, 4, 4)


# --- the classifier --------------------------------------------------------------------------


def test_classifier_matches_hand_computation_for_two_classes_two_templates():
    # "cat" -> (3, 0, 0), "dog" -> (0, 3, 0), "drawn" -> (0, 0, 4); other words -> 0
    names, template_list = ["cat", "dog"], ["{}", "a drawn {}"]
    tokenizer = WordTokenizer(["cat dog a drawn"])
    vectors = torch.zeros(tokenizer.vocab_size, 3)
    vectors[tokenizer.vocab["cat"]] = torch.tensor([3.0, 0, 0])
    vectors[tokenizer.vocab["dog"]] = torch.tensor([0, 3.0, 0])
    vectors[tokenizer.vocab["drawn"]] = torch.tensor([0, 0, 4.0])
    model = BagModel(vectors)
    classifier = zeroshot_classifier(model, tokenizer, render_prompts(names, template_list))
    # cat: mean((1, 0, 0), (0.6, 0, 0.8)) = (0.8, 0, 0.4), normalised = (2, 0, 1) / sqrt(5)
    # dog: mean((0, 1, 0), (0, 0.6, 0.8)) = (0, 0.8, 0.4), normalised = (0, 2, 1) / sqrt(5)
    expected = torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0]]) / math.sqrt(5)
    torch.testing.assert_close(classifier, expected)


def brute_force_classifier(model, tokenizer, class_prompts) -> Tensor:
    rows = []
    for prompts in class_prompts:
        embeddings = []
        for prompt in prompts:  # one prompt per forward, no padding at all
            tokens = tokenizer.batch_encode([prompt])
            embeddings.append(F.normalize(model.encode_text(*tokens, normalize=False)[0], dim=-1))
        mean = torch.stack(embeddings).mean(dim=0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("batch_size", [1, 5, 7, 1000])
def test_classifier_is_independent_of_batch_size_and_matches_per_prompt_brute_force(batch_size):
    names = ["red car", "dog", "blue bird", "tree"]
    class_prompts = render_prompts(names, ["{}", "a photo of a {}.", "a big {} here"])
    class_prompts[2] = class_prompts[2][:2]  # classes may have different numbers of prompts
    tokenizer = WordTokenizer([p for prompts in class_prompts for p in prompts])
    model = BagModel(torch.randn(tokenizer.vocab_size, 6))
    expected = brute_force_classifier(model, tokenizer, class_prompts)
    classifier = zeroshot_classifier(model, tokenizer, class_prompts, batch_size=batch_size)
    torch.testing.assert_close(classifier, expected)


def test_classifier_rejects_a_class_without_prompts():
    tokenizer = WordTokenizer(["a"])
    model = BagModel(torch.randn(tokenizer.vocab_size, 2))
    with pytest.raises(ValueError, match="class 1"):
        zeroshot_classifier(model, tokenizer, [["a"], []])


# --- the metrics ---------------------------------------------------------------------------


def test_metrics_match_brute_force_on_random_logits_with_an_absent_class():
    num_classes, n, absent = 7, 300, 3
    logits = torch.randn(n, num_classes)
    labels = torch.randint(0, num_classes - 1, (n,))
    labels[labels >= absent] += 1  # no image of class 3 (it can still be predicted)
    metrics = ZeroShotMetrics(num_classes, top_k=(1, 3, 5, 10))
    for chunk in range(0, n, 64):
        metrics.update(logits[chunk : chunk + 64], labels[chunk : chunk + 64])
    result = metrics.compute([f"class {c}" for c in range(num_classes)])

    # brute force: the rank of the true class, a Python confusion loop, per-class recall
    ranks = [int((logits[i] > logits[i, labels[i]]).sum()) for i in range(n)]
    for k in (1, 3, 5, 10):  # k = 10 > 7 classes: capped, every image counts
        assert result.top_k[k] == pytest.approx(sum(r < k for r in ranks) / n)
    assert result.top1 == result.top_k[1] and result.top5 == result.top_k[5]
    assert result.top_k[10] == 1.0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(n):
        confusion[labels[i], logits[i].argmax()] += 1
    assert torch.equal(result.confusion, confusion)
    reference = MulticlassConfusionMatrix(num_classes)(logits, labels)
    assert torch.equal(result.confusion, reference)
    recalls = []
    for c in range(num_classes):
        members = [i for i in range(n) if labels[i] == c]
        if not members:
            assert math.isnan(result.per_class_accuracy[c])
            continue
        recall = sum(int(logits[i].argmax() == c) for i in members) / len(members)
        assert result.per_class_accuracy[c] == pytest.approx(recall)
        recalls.append(recall)
    assert math.isnan(result.per_class_accuracy[absent])
    assert result.mean_per_class_recall == pytest.approx(sum(recalls) / len(recalls))
    assert torch.equal(result.predictions, logits.argmax(dim=1))
    assert torch.equal(result.labels, labels)
    assert result.n_samples == n
    assert result.support == [int((labels == c).sum()) for c in range(num_classes)]

    report = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert report["per_class_accuracy"]["class 3"] is None
    assert report["per_class_accuracy"]["class 0"] == pytest.approx(result.per_class_accuracy[0])
    assert report["top3"] == result.top_k[3] and report["top1"] == result.top1
    assert report["n_classes"] == 7 and report["n_classes_present"] == 6


def test_metrics_reject_labels_outside_the_classes_and_empty_data():
    metrics = ZeroShotMetrics(3)
    with pytest.raises(ValueError, match="label -1"):
        metrics.update(torch.randn(2, 3), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="label 3"):
        metrics.update(torch.randn(2, 3), torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="no images"):
        metrics.compute(["a", "b", "c"])


def test_to_dict_keeps_repeated_class_names_apart():
    metrics = ZeroShotMetrics(3)
    metrics.update(torch.eye(3), torch.arange(3))
    per_class = metrics.compute(["crane", "dog", "crane"]).to_dict()["per_class_accuracy"]
    assert per_class == {"crane (0)": 1.0, "dog": 1.0, "crane (2)": 1.0}


# --- evaluation ------------------------------------------------------------------------------


def test_perfect_model_scores_100_percent_with_a_diagonal_confusion():
    names, template_list = class_names("cifar10"), templates("cifar10")
    tokenizer = WordTokenizer([p for ps in render_prompts(names, template_list) for p in ps])
    model = one_hot_model(tokenizer, names)
    labels = torch.arange(10).repeat(3)
    loader = DataLoader(TensorDataset(images_of(labels, 10), labels), batch_size=8)
    result = zeroshot_evaluate(model, tokenizer, loader, names, template_list, progress=False)
    assert result.top1 == 1.0 and result.top5 == 1.0 and result.mean_per_class_recall == 1.0
    assert torch.equal(result.confusion, torch.diag(torch.full((10,), 3)))
    assert result.per_class_accuracy == [1.0] * 10
    assert result.n_samples == 30


def random_setup(num_classes: int = 6, dim: int = 8):
    names = [f"thing{c}" for c in range(num_classes)]
    template_list = ["a {}", "the {} photo", "{} again"]
    tokenizer = WordTokenizer([p for ps in render_prompts(names, template_list) for p in ps])
    model = BagModel(torch.randn(tokenizer.vocab_size, dim))
    images = torch.randn(50, 3, 4, 4)
    labels = torch.randint(0, num_classes, (50,))
    return names, template_list, tokenizer, model, images, labels


def test_evaluation_matches_brute_force_with_tuple_and_dict_batches():
    names, template_list, tokenizer, model, images, labels = random_setup()
    classifier = brute_force_classifier(model, tokenizer, render_prompts(names, template_list))
    features = F.normalize(images.flatten(1)[:, :8], dim=-1)
    logits = features @ classifier.T  # (N, C)

    tuples = DataLoader(TensorDataset(images, labels), batch_size=16)
    dicts = [
        {"images": images[i : i + 16], "labels": labels[i : i + 16], "keys": ["x"]}
        for i in range(0, 50, 16)
    ]
    for batches in (tuples, dicts, iter(dicts)):  # a generator has no len()
        result = zeroshot_evaluate(
            model, tokenizer, batches, names, template_list, progress=False, top_k=(2,)
        )
        ranks = torch.tensor([int((logits[i] > logits[i, labels[i]]).sum()) for i in range(50)])
        assert result.top1 == pytest.approx(float((ranks < 1).float().mean()))
        assert result.top_k[2] == pytest.approx(float((ranks < 2).float().mean()))
        assert result.top5 == pytest.approx(float((ranks < 5).float().mean()))
        assert torch.equal(result.predictions, logits.argmax(dim=1))
        assert torch.equal(result.labels, labels)


def test_evaluation_runs_in_eval_mode_and_restores_each_training_flag():
    names, template_list, tokenizer, model, images, labels = random_setup()
    model.train()
    model.dropout.eval()  # a submodule kept in eval during training stays in eval
    zeroshot_evaluate(model, tokenizer, [(images, labels)], names, template_list, progress=False)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training and not model.dropout.training


def test_bf16_runs_both_towers_under_autocast_and_fp32_under_none():
    names, template_list = class_names("cifar10"), templates("cifar10")
    tokenizer = WordTokenizer([p for ps in render_prompts(names, template_list) for p in ps])
    model = one_hot_model(tokenizer, names)
    labels = torch.arange(10)
    batches = [(images_of(labels, 10), labels)]
    result = zeroshot_evaluate(
        model, tokenizer, batches, names, template_list, precision="bf16", progress=False
    )
    assert result.top1 == 1.0
    assert model.autocast_seen and set(model.autocast_seen) == {torch.bfloat16}
    model.autocast_seen.clear()
    zeroshot_evaluate(model, tokenizer, batches, names, template_list, progress=False)
    assert model.autocast_seen and set(model.autocast_seen) == {None}
    with pytest.raises(ValueError, match="precision"):
        zeroshot_evaluate(model, tokenizer, batches, names, template_list, precision="fp8")


def test_evaluation_rejects_batches_it_cannot_read():
    names, template_list, tokenizer, model, images, labels = random_setup()
    with pytest.raises(ValueError, match="'images' and 'labels'"):
        zeroshot_evaluate(
            model, tokenizer, [{"image": images}], names, template_list, progress=False
        )


def test_zeroshot_logits_are_cosine_similarities():
    features = F.normalize(torch.randn(4, 5), dim=-1)
    classifier = F.normalize(torch.randn(3, 5), dim=-1)
    expected = torch.tensor(
        [[float(F.cosine_similarity(f, w, dim=0)) for w in classifier] for f in features]
    )
    torch.testing.assert_close(zeroshot_logits(features, classifier), expected)


# --- class names and templates ----------------------------------------------------------------


def test_builtin_lists():
    assert len(class_names("imagenet")) == 1000
    assert class_names("cifar10")[:3] == ("airplane", "automobile", "bird")
    assert len(class_names("cifar10")) == 10
    cifar100 = class_names("cifar100")
    assert len(set(cifar100)) == 100
    # the dataset's meta order: alphabetical by the label with underscores
    underscored = [name.replace(" ", "_") for name in cifar100]
    assert underscored == sorted(underscored)
    assert {"aquarium fish", "sweet pepper", "willow tree"} <= set(cifar100)
    assert len(CIFAR_TEMPLATES) == len(set(CIFAR_TEMPLATES)) == 18
    assert templates("cifar100") == templates("cifar10") == CIFAR_TEMPLATES
    assert class_names("digits") == ("zero", "one", "two", "three", "four") + (
        "five", "six", "seven", "eight", "nine",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "reference"),
    [("imagenet", OPENAI_IMAGENET_TEMPLATES), ("imagenet_simple", SIMPLE_IMAGENET_TEMPLATES)],
)
def test_imagenet_templates_render_as_open_clip_lambdas(name, reference):
    converted = templates(name)
    assert len(converted) == len(reference) and all(isinstance(t, str) for t in converted)
    for class_name in ("goldfish", "great white shark"):
        rendered = render_prompts([class_name], converted)[0]
        assert rendered == [t(class_name) for t in reference]


def test_digit_templates_render_as_the_demo_held_out_captions():
    prompts = render_prompts(class_names("digits"), templates("digits"))
    assert prompts == [render_captions(label, HELD_OUT_TEMPLATES) for label in range(10)]


def test_text_file_ignores_blank_lines_and_comments(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\nred car\n\n  dog  \n# done\n")
    assert class_names(path) == ("red car", "dog")
    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n# comment\n{} in the wild\n")
    assert templates(str(path)) == ("a photo of a {}.", "{} in the wild")


def test_json_lists_and_objects(tmp_path):
    listed = tmp_path / "classes.json"
    listed.write_text(json.dumps(["cat", "dog"]))
    assert class_names(listed) == ("cat", "dog")
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"classes": ["cat"], "templates": ["a {}"]}))
    assert class_names(both) == ("cat",) and templates(both) == ("a {}",)
    only_classes = tmp_path / "only.json"
    only_classes.write_text(json.dumps({"classes": ["cat"]}))
    with pytest.raises(ValueError, match="'templates'"):
        templates(only_classes)
    numbers = tmp_path / "numbers.json"
    numbers.write_text(json.dumps(["cat", 3]))
    with pytest.raises(ValueError, match=r"numbers\.json\[1\]"):
        class_names(numbers)


def test_template_without_placeholder_names_file_and_line(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# comment\na photo of a {}.\n\na photo of a {c}.\n")
    with pytest.raises(ValueError, match=r"templates\.txt:4: template 'a photo of a \{c\}\.'"):
        templates(path)
    entry = tmp_path / "templates.json"
    entry.write_text(json.dumps({"templates": ["a {}", "no placeholder"]}))
    with pytest.raises(ValueError, match=r"templates\.json\['templates'\]\[1\]"):
        templates(entry)
    with pytest.raises(ValueError, match="has no"):
        render_prompts(["cat"], ["a cat"])


def test_unknown_names_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in"):
        class_names("imagenet21k")
    with pytest.raises(FileNotFoundError):
        templates(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no class names"):
        class_names(empty)


def test_our_clip_with_the_clip_tokenizer_matches_a_per_class_loop():
    from multimodal.layers import TransformerConfig
    from multimodal.models import CLIP
    from text import TextConfig, TextEncoder, load_tokenizer
    from vision import ViT, ViTConfig

    image_tower = ViT(ViTConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2))
    text_config = TransformerConfig(
        dim=32, n_layers=1, n_heads=2, causal=True, position="learned", max_positions=16
    )
    text_tower = TextEncoder(TextConfig(vocab_size=49408, transformer=text_config))
    model = CLIP(image_tower, text_tower, embed_dim=16)
    tokenizer = load_tokenizer("clip")
    names, template_list = class_names("digits"), templates("digits")
    images, labels = torch.randn(12, 3, 16, 16), torch.arange(12) % 10
    result = zeroshot_evaluate(
        model,
        tokenizer,
        [{"images": images, "labels": labels}],
        names,
        template_list,
        context_length=16,
        text_batch_size=3,
        progress=False,
    )
    model.eval()
    with torch.no_grad():
        rows = []
        for prompts in render_prompts(names, template_list):  # one class per forward
            tokens = tokenizer.batch_encode(prompts, max_length=16)
            mean = model.encode_text(*tokens).mean(dim=0)
            rows.append(mean / mean.norm())
        logits = model.encode_image(images) @ torch.stack(rows).T
    assert torch.equal(result.predictions, logits.argmax(dim=1))
    assert result.top1 == pytest.approx(float((logits.argmax(dim=1) == labels).float().mean()))

"""Linear probe and few-shot k-NN on frozen image features.

Linear probe (CLIP's protocol, Radford et al. 2021, appendix A.3): multinomial logistic
regression on the training features, its L2 strength chosen on a validation split carved from
them (a coarse sweep over C = 10^-6 .. 10^6, then a refinement in log space around the best;
the best is the highest validation accuracy, a tie broken by the lower validation
cross-entropy: a small validation split often ties many C, and taking the smallest of them,
as we did first, chose C ~ 4e-5 for two of four split seeds on the demo digits CLIP's
train + val features, top-1 0.956 where the others reached 0.97-0.98),
refitted on train + validation with the chosen C and scored on the test features. Features
are standardised first with the statistics of the data each model is fitted on (per
dimension: zero mean, unit variance): C then means the same for every model, and L-BFGS
converges in far fewer steps on features as concentrated as a CLIP's (cosines ~0.99). The
objective is scikit-learn's `LogisticRegression(C=C)` (multinomial, intercept not penalised),
divided by the number of samples:

    mean cross-entropy + ||W||^2 / (2 C N)

minimised full-batch by L-BFGS in torch (float64 by default), so it runs where the features
are (a GPU included) without scikit-learn.

Zero-shot prior (`linear_probe(..., prior=classifier)`): the same protocol, but the weights
are pulled towards the model's own zero-shot head instead of towards zero. The logits are
`a * zero-shot logits + x @ V.T + b` with a fitted temperature `a` (not penalised) and the
departure (V, b) penalised, `||V||^2 + ||b||^2` in place of `||W||^2`. As C -> 0 the probe
becomes the zero-shot classifier (same predictions), so the validation sweep can only prefer a
departure from zero-shot that validation accuracy supports. A plain probe has to learn the
classes again from the labelled images alone; where the zero-shot head is already at the
features' linear separability (the demo digits CLIP: probe - zero-shot within +-2 of 270 test
images over four trainings), the plain probe is level with zero-shot, and the prior keeps what
zero-shot knows while the labels correct it (the instance-level demo CLIP: zero-shot 0.889,
plain probe 0.893, with the prior 0.907).

k-NN: each test feature takes the k training features of highest cosine similarity; each votes
for its class and the class with the most votes wins (a tie: the class whose voters have the
larger summed similarity, then the lower label). `few_shot_indices` keeps N random training
samples per class first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

COARSE_EXPONENTS = tuple(range(-6, 7))  # C = 10^e
REFINE_STEPS = 4  # halvings of the log10 step around the best C (1/2, 1/4, 1/8, 1/16)
VAL_FRACTION = 0.2


def _check(features: Tensor, labels: Tensor, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"{name}: expected features (N, D) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError(f"{name}: no samples")


@dataclass
class LogisticModel:
    """Multinomial logistic regression: logits = x @ weight.T + bias."""

    weight: Tensor  # (C, D)
    bias: Tensor  # (C,)

    def logits(self, features: Tensor) -> Tensor:
        """(N, D) -> (N, C)."""
        return features.to(self.weight.dtype) @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        """(N, D) -> (N,) predicted classes."""
        return self.logits(features).argmax(dim=1)


def fit_logistic(
    features: Tensor,
    labels: Tensor,
    n_classes: int,
    c: float,
    *,
    prior: LogisticModel | None = None,
    max_iter: int = 1000,
    dtype: torch.dtype = torch.float64,
) -> LogisticModel:
    """Logistic regression with inverse L2 strength `c` (scikit-learn's C), fitted by
    full-batch L-BFGS (strong Wolfe line search) from zero weights.

    With `prior` (a head on the same features, e.g. the zero-shot classifier): logits
    `a * prior.logits(x) + x @ V.T + b`, the temperature `a` free, `(V, b)` penalised instead
    of the weights (see the module docstring); returned as one head, `a * prior + (V, b)`."""
    _check(features, labels, "fit_logistic")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"c={c} must be a finite number > 0")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes}), got {labels.min()}..{labels.max()}")
    x = features.to(dtype)
    y = labels.to(x.device).long()
    n = len(y)
    rows = torch.arange(n, device=x.device)
    weight = torch.zeros(n_classes, x.shape[1], dtype=dtype, device=x.device)
    bias = torch.zeros(n_classes, dtype=dtype, device=x.device)
    temperature = torch.ones((), dtype=dtype, device=x.device)
    prior_logits, prior_scale = None, 1.0
    if prior is not None:
        if tuple(prior.weight.shape) != (n_classes, x.shape[1]):
            raise ValueError(
                f"prior: expected a ({n_classes}, {x.shape[1]}) head, got "
                f"{tuple(prior.weight.shape)}"
            )
        prior = LogisticModel(prior.weight.to(x), prior.bias.to(x))
        prior_logits = prior.logits(x)  # (N, C)
        # start the temperature at a unit spread of the prior's logits (L-BFGS fits it)
        prior_scale = 1 / max(prior_logits.std().item(), torch.finfo(dtype).tiny)
        prior_logits = prior_logits * prior_scale
    parameters = [weight, bias] if prior_logits is None else [weight, bias, temperature]
    optimizer = torch.optim.LBFGS(
        parameters,
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    @torch.no_grad()
    def closure() -> Tensor:
        # the gradient in closed form (softmax - one-hot): a third of autograd's time here
        logits = x @ weight.T + bias  # (N, C)
        penalty = weight.pow(2).sum()
        if prior_logits is not None:
            logits = logits + temperature * prior_logits
            penalty = penalty + bias.pow(2).sum()
        loss = F.cross_entropy(logits, y) + penalty / (2 * c * n)
        residual = logits.softmax(dim=1)
        residual[rows, y] -= 1
        residual /= n
        weight.grad = residual.T @ x + weight / (c * n)  # (C, D)
        bias.grad = residual.sum(0)  # (C,)
        if prior_logits is not None:
            bias.grad += bias / (c * n)
            temperature.grad = (residual * prior_logits).sum()
        return loss

    optimizer.step(closure)
    if prior is None:
        return LogisticModel(weight, bias)
    scale = temperature * prior_scale
    return LogisticModel(weight + scale * prior.weight, bias + scale * prior.bias)


@dataclass
class Standardizer:
    """Per-dimension zero mean and unit variance with the statistics of fitted features (a
    constant dimension is only centred)."""

    mean: Tensor  # (D,)
    std: Tensor  # (D,)

    @classmethod
    def fit(cls, features: Tensor) -> Standardizer:
        x = features.double()
        std = x.std(0, correction=0)
        return cls(x.mean(0), torch.where(std > 0, std, torch.ones_like(std)))

    def __call__(self, features: Tensor) -> Tensor:
        return (features.double() - self.mean) / self.std

    def head(self, classifier: Tensor) -> LogisticModel:
        """The head on standardised features equal to `features @ classifier.T` on the raw
        ones: weight `classifier * std`, bias `classifier @ mean`."""
        classifier = classifier.to(self.mean)
        return LogisticModel(classifier * self.std, classifier @ self.mean)


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Share of predictions equal to the labels."""
    return (predictions.cpu() == labels.cpu()).double().mean().item()


@dataclass
class Sweep:
    """The C chosen on the validation split, and the validation accuracy and cross-entropy
    of every C tried."""

    best_c: float
    scores: dict[float, float]  # C -> validation accuracy
    losses: dict[float, float]  # C -> validation cross-entropy


def best_c(scores: dict[float, float], losses: dict[float, float]) -> float:
    """The C of the highest accuracy; a tie: the lower cross-entropy, then the smaller C."""
    return min(scores, key=lambda c: (-scores[c], losses[c], c))


@dataclass
class Fold:
    """One validation round of a C sweep: fit on `train`, score on `val` ((features, labels),
    standardised with `train`'s statistics), towards `prior` where given."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    prior: LogisticModel | None = None


def sweep_c(
    folds: Sequence[Fold],
    n_classes: int,
    *,
    coarse: Sequence[float] = COARSE_EXPONENTS,
    refine_steps: int = REFINE_STEPS,
    max_iter: int = 1000,
    progress: bool = False,
) -> Sweep:
    """C = 10^e for each e of `coarse`, then `refine_steps` rounds that try the best exponent
    +- a step halved each round (starting at half the coarse spacing); each C is fitted on
    every fold's `train` and scored on its `val` (each fit from zero weights, so a score does
    not depend on the order of the sweep). A C's accuracy and cross-entropy are pooled over
    the folds (correct predictions over all their validation samples). The best C (`best_c`)
    and every score."""
    if not coarse:
        raise ValueError("coarse: expected at least one exponent")
    if not folds:
        raise ValueError("folds: expected at least one train/validation fold")
    scores: dict[float, float] = {}
    losses: dict[float, float] = {}
    exponents: dict[float, float] = {}  # C -> its exponent
    bar = tqdm(
        total=len(folds) * (len(set(coarse)) + 2 * refine_steps),
        disable=not progress,
        desc="probe C",
        unit="fit",
    )

    def score(exponent: float) -> None:
        c = 10.0**exponent
        if c not in scores:
            correct, loss, count = 0.0, 0.0, 0
            for fold in folds:
                model = fit_logistic(*fold.train, n_classes, c, prior=fold.prior, max_iter=max_iter)
                logits = model.logits(fold.val[0])
                labels = fold.val[1].to(logits.device)
                correct += (logits.argmax(1) == labels).sum().item()
                loss += F.cross_entropy(logits, labels, reduction="sum").item()
                count += len(labels)
                bar.update()
            scores[c], losses[c], exponents[c] = correct / count, loss / count, exponent
        else:
            bar.update(len(folds))

    for exponent in coarse:
        score(float(exponent))

    ordered = sorted(float(e) for e in coarse)
    step = (ordered[-1] - ordered[0]) / max(1, len(ordered) - 1) / 2 or 0.5
    for _ in range(refine_steps):
        centre = exponents[best_c(scores, losses)]
        score(centre - step)
        score(centre + step)
        step /= 2
    bar.close()
    return Sweep(best_c(scores, losses), scores, losses)


def _units(labels: Tensor, groups: Sequence[Hashable] | None) -> dict[int, list[Tensor]]:
    """{label: [sample indices of one unit]}: the units the splits deal out whole, each
    sample alone or, with `groups` (one per sample), the samples of one group together,
    filed under the label of the group's first sample."""
    if groups is None:
        members: dict[Hashable, list[int]] = {i: [i] for i in range(len(labels))}
    else:
        if len(groups) != len(labels):
            raise ValueError(f"groups: expected one per sample ({len(labels)}), got {len(groups)}")
        members = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
    units: dict[int, list[Tensor]] = {}
    for indices in members.values():
        units.setdefault(int(labels[indices[0]]), []).append(torch.tensor(indices))
    return dict(sorted(units.items()))


def _shuffled(units: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    return [units[i] for i in torch.randperm(len(units), generator=generator).tolist()]


def split_train_val(
    labels: Tensor,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> tuple[Tensor, Tensor]:
    """(train indices, val indices): per class, `val_fraction` of its samples (rounded, at
    least one, never all) drawn at random for validation; a class of one sample stays in
    train. With `groups` (one per sample, e.g. the source a sample was rendered or augmented
    from) whole groups are drawn instead, so no group is on both sides: near-copies of a
    training image in validation would score every C as if it generalised. Sorted indices."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train, val = [], []
    for units in _units(labels, groups).values():
        units = _shuffled(units, generator)
        n_val = min(len(units) - 1, max(1, round(val_fraction * len(units))))
        val.extend(units[:n_val])
        train.extend(units[n_val:])
    if not val:
        raise ValueError("no validation samples: every class has a single training sample (group)")
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def k_fold_splits(
    labels: Tensor,
    folds: int,
    repeats: int = 1,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """(train indices, val indices) of stratified k-fold cross-validation, `repeats` times
    with fresh shuffles: per class, its samples (with `groups`: its whole groups, as in
    `split_train_val`) shuffled and dealt to the folds in turn, so every sample is validated
    once per repeat and each fold holds ~1/k of every class. Sorted indices."""
    if folds < 2:
        raise ValueError(f"folds={folds} must be >= 2")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    labels = labels.cpu()
    units_by_class = _units(labels, groups)
    n_units = sum(len(units) for units in units_by_class.values())
    if n_units < folds:
        what = "samples" if groups is None else "groups"
        raise ValueError(f"{folds}-fold cross-validation needs >= {folds} {what}, got {n_units}")
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for _ in range(repeats):
        fold_of = torch.empty(len(labels), dtype=torch.long)
        dealt = 0  # classes continue the deal where the last stopped, so the folds stay even
        for units in units_by_class.values():
            for unit in _shuffled(units, generator):
                fold_of[unit] = dealt % folds
                dealt += 1
        for fold in range(folds):
            splits.append(
                (torch.nonzero(fold_of != fold).flatten(), torch.nonzero(fold_of == fold).flatten())
            )
    return splits


@dataclass
class ProbeResult:
    """A linear probe: test top-1, the chosen C, its validation accuracy (pooled over the
    folds with cross-validation), the sizes."""

    top1: float
    c: float
    val_top1: float
    n_train: int  # samples each C was fitted on (with cross-validation: all, refitted)
    n_val: int  # validation samples (with cross-validation: all, each once per repeat)
    n_test: int
    sweep: dict[float, float] = field(repr=False)
    predictions: Tensor = field(repr=False)  # (N_test,)
    folds: int | None = None  # k of k-fold cross-validation; None: one validation split
    repeats: int = 1
    n_groups: int | None = None  # groups kept whole by the validation splits

    def to_dict(self) -> dict[str, float | int]:
        validation = (
            {} if self.folds is None else {"cv_folds": self.folds, "cv_repeats": self.repeats}
        )
        if self.n_groups is not None:
            validation["n_groups"] = self.n_groups
        return {
            "top1": self.top1,
            "C": self.c,
            "val_top1": self.val_top1,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "n_C_tried": len(self.sweep),
            **validation,
        }


def linear_probe(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    n_classes: int,
    *,
    val_fraction: float = VAL_FRACTION,
    folds: int | None = None,
    repeats: int = 1,
    seed: int = 0,
    groups: Sequence[Hashable] | None = None,
    coarse: Sequence[float] = COARSE_EXPONENTS,
    refine_steps: int = REFINE_STEPS,
    prior: Tensor | None = None,
    max_iter: int = 1000,
    progress: bool = False,
) -> ProbeResult:
    """CLIP's linear probe: C swept on a validation split of `train` (`val_fraction` of each
    class) or, with `folds`, by stratified k-fold cross-validation repeated `repeats` times
    (for small training sets, where one split's score is too noisy to choose C); the model
    refitted on all of `train` with it and scored on `test`. Features (N, D), labels (N,) in
    [0, C), standardised with the statistics of the features each model is fitted on.
    `groups` (one per training sample): keep each group on one side of every split.
    `prior`: a (C, D) head on the raw features (the zero-shot classifier: logits
    `features @ prior.T`) that the weights are pulled towards instead of towards zero
    (module docstring)."""
    _check(*train, "train")
    _check(*test, "test")
    if prior is not None and tuple(prior.shape) != (n_classes, train[0].shape[1]):
        raise ValueError(
            f"prior: expected the ({n_classes}, {train[0].shape[1]}) zero-shot classifier, got "
            f"{tuple(prior.shape)}"
        )
    if folds is None:
        splits = [split_train_val(train[1], val_fraction, seed, groups)]
    else:
        splits = k_fold_splits(train[1], folds, repeats, seed, groups)
    x = train[0]
    y = train[1].to(x.device)

    def fold(fit_index: Tensor, val_index: Tensor) -> Fold:
        fit_index, val_index = fit_index.to(x.device), val_index.to(x.device)
        scale = Standardizer.fit(x[fit_index])
        return Fold(
            (scale(x[fit_index]), y[fit_index]),
            (scale(x[val_index]), y[val_index]),
            None if prior is None else scale.head(prior),
        )

    found = sweep_c(
        [fold(*split) for split in splits],
        n_classes,
        coarse=coarse,
        refine_steps=refine_steps,
        max_iter=max_iter,
        progress=progress,
    )
    scale = Standardizer.fit(x)
    model = fit_logistic(
        scale(x),
        y,
        n_classes,
        found.best_c,
        prior=None if prior is None else scale.head(prior),
        max_iter=max_iter,
    )
    predictions = model.predict(scale(test[0])).cpu()
    single = folds is None
    return ProbeResult(
        top1=accuracy(predictions, test[1]),
        c=found.best_c,
        val_top1=found.scores[found.best_c],
        n_train=len(splits[0][0]) if single else len(y),
        n_val=len(splits[0][1]) if single else len(y),
        n_test=len(test[1]),
        sweep=found.scores,
        predictions=predictions,
        folds=folds,
        repeats=1 if single else repeats,
        n_groups=None if groups is None else len(set(groups)),
    )


def few_shot_indices(labels: Tensor, shots: int, seed: int = 0) -> Tensor:
    """Sorted indices of `shots` random samples of each class (all of a smaller class)."""
    if shots < 1:
        raise ValueError(f"shots={shots} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for label in torch.unique(labels).tolist():
        index = torch.nonzero(labels == label).flatten()
        chosen.append(index[torch.randperm(len(index), generator=generator)[:shots]])
    return torch.cat(chosen).sort().values


def knn_predict(
    train: tuple[Tensor, Tensor],
    test_features: Tensor,
    k: int,
    n_classes: int,
    *,
    chunk: int = 1024,
) -> Tensor:
    """(N_test,) classes by a k-nearest-neighbour vote under cosine similarity (see the module
    docstring for ties); k is capped at the number of training samples."""
    features, labels = train
    _check(features, labels, "knn train")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    k = min(k, len(labels))
    gallery = F.normalize(features.float(), dim=-1)
    labels = labels.to(gallery.device).long()
    out = []
    for start in range(0, len(test_features), chunk):
        queries = F.normalize(test_features[start : start + chunk].float(), dim=-1)
        top, index = (queries.to(gallery.device) @ gallery.T).topk(k, dim=1)  # (q, k)
        one_hot = F.one_hot(labels[index], n_classes).to(top.dtype)  # (q, k, C)
        votes = one_hot.sum(1)  # (q, C)
        similarity = (one_hot * top.unsqueeze(2)).sum(1)  # (q, C) in [-k, k]
        # one more vote outweighs any difference of summed similarity (at most 2k)
        out.append((votes * (2 * k + 1) + similarity).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@dataclass
class KnnResult:
    """Few-shot k-NN: test top-1, k, the shots per class (None: all) and the gallery size."""

    top1: float
    k: int
    shots: int | None
    n_train: int
    n_test: int
    predictions: Tensor = field(repr=False)

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "top1": self.top1,
            "k": self.k,
            "shots_per_class": self.shots,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def knn_probe(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    k: int,
    n_classes: int,
    *,
    shots: int | None = None,
    seed: int = 0,
) -> KnnResult:
    """k-NN top-1 on `test` with `train` (or `shots` random samples a class of it)."""
    _check(*test, "test")
    features, labels = train[0], train[1].to(train[0].device)
    if shots is not None:
        index = few_shot_indices(labels, shots, seed).to(features.device)
        features, labels = features[index], labels[index]
    predictions = knn_predict((features, labels), test[0], k, n_classes)
    return KnnResult(
        top1=accuracy(predictions, test[1]),
        k=min(k, len(labels)),
        shots=shots,
        n_train=len(labels),
        n_test=len(test[1]),
        predictions=predictions,
    )

"""Classification metrics shared by every modality: top-k, mean per-class accuracy, confusion.

:class:`ClassificationMeter` collects per-view scores with the sample index they belong to and,
at :meth:`~ClassificationMeter.compute`, gathers them across DDP ranks, averages the softmax of
every sample's views (multi-view / voting test), counts each sample once (a padded sampler may
repeat some on several ranks) and returns the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mm3d.distributed import all_gather_cat


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k (k larger than the class count counts as the class count).

    scores: (N, C) logits or probabilities; labels: (N,) class ids.
    """
    out = {}
    maxk = min(max(ks), scores.shape[1])
    top = scores.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top == labels[:, None]
    for k in ks:
        out[f"top{k}"] = float(hit[:, : min(k, maxk)].any(dim=1).float().mean()) if len(labels) else 0.0
    return out


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(conf: torch.Tensor) -> torch.Tensor:
    """(C,) recall of every class; NaN for classes without samples."""
    support = conf.sum(dim=1).double()
    return torch.where(support > 0, conf.diag().double() / support.clamp(min=1), torch.nan)


def mean_class_accuracy(conf: torch.Tensor) -> float:
    """Mean of the per-class accuracies over the classes that have samples."""
    acc = per_class_accuracy(conf)
    acc = acc[~acc.isnan()]
    return float(acc.mean()) if len(acc) else 0.0


@dataclass
class ClassificationResult:
    metrics: dict[str, float]
    probs: torch.Tensor  # (S, C) view-averaged probabilities of the S unique samples
    labels: torch.Tensor  # (S,)
    index: torch.Tensor  # (S,) sample ids, ascending
    confusion: torch.Tensor  # (C, C)


class ClassificationMeter:
    """Accumulates (scores, labels, sample index) over batches; see the module docstring."""

    def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5)) -> None:
        self.num_classes, self.ks = num_classes, tuple(ks)
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """logits: (N, C) per view; labels: (N,); index: (N,) sample id of each view (None: unique)."""
        if index is None:
            start = sum(len(x) for x in self.labels)
            index = torch.arange(start, start + len(labels), device=labels.device)
        self.scores.append(logits.detach().float().softmax(dim=1))
        self.labels.append(labels.detach().long())
        self.index.append(index.detach().long())

    def compute(self) -> ClassificationResult:
        device = self.scores[0].device if self.scores else torch.device("cpu")
        probs = torch.cat(self.scores) if self.scores else torch.zeros(0, self.num_classes, device=device)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long, device=device)
        index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long, device=device)
        probs, labels, index = all_gather_cat(probs), all_gather_cat(labels), all_gather_cat(index)
        uniq, inverse = torch.unique(index, return_inverse=True)
        # a view repeated by a padding sampler appears twice with identical scores: collapse exact
        # (index, view) duplicates by averaging per unique sample weighted equally per view row
        sums = torch.zeros(len(uniq), probs.shape[1], dtype=torch.float64, device=probs.device)
        sums.index_add_(0, inverse, probs.double())
        counts = torch.bincount(inverse, minlength=len(uniq)).double().clamp(min=1)
        avg = (sums / counts[:, None]).float()
        lab = torch.zeros(len(uniq), dtype=torch.long, device=labels.device)
        lab[inverse] = labels
        conf = confusion_matrix(avg.argmax(1).cpu(), lab.cpu(), self.num_classes)
        metrics = topk_accuracy(avg, lab, self.ks)
        metrics["mean_class_acc"] = mean_class_accuracy(conf)
        metrics["num_samples"] = float(len(uniq))
        return ClassificationResult(metrics, avg.cpu(), lab.cpu(), uniq.cpu(), conf)


def plot_confusion(conf: torch.Tensor, class_names: Sequence[str] | None, path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion-matrix PNG (true class on rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = conf.double()
    norm = (c / c.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = conf.shape[0]
    size = min(16.0, max(4.0, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    if n <= 60:
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if conf[i, j]:
                    ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

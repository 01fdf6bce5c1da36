"""Part-segmentation metrics under the standard ShapeNetPart protocol, batched.

The protocol (PointNet / PointNet++ / Point-MAE evaluation scripts):

* each shape belongs to one category, and its prediction is restricted to that category's parts
  (the argmax is taken over the category's part logits only);
* a shape's IoU is the mean over its category's parts of ``|pred ∩ gt| / |pred ∪ gt|``, where a
  part that appears in neither the prediction nor the ground truth counts as IoU 1;
* **instance mIoU** is the mean of the shape IoUs over all shapes;
* **class mIoU** is the mean over categories of the mean shape IoU of that category (categories
  without test shapes are left out, so a partial dataset still gives a number).

Axes: B shapes, N points, P parts (50 for ShapeNetPart), C categories (16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from mm3d.distributed import all_gather_cat


def category_part_mask(part_sets: Sequence[Sequence[int]], num_parts: int) -> torch.Tensor:
    """(C, P) bool: ``mask[c, p]`` is True when part p belongs to category c.

    part_sets: for every category (in label order) its global part ids.
    """
    mask = torch.zeros(len(part_sets), num_parts, dtype=torch.bool)
    for c, parts in enumerate(part_sets):
        for p in parts:
            if not 0 <= int(p) < num_parts:
                raise ValueError(f"part id {p} of category {c} is outside [0, {num_parts})")
            mask[c, int(p)] = True
    return mask


def restrict_to_category(logits: torch.Tensor, cls_label: torch.Tensor, part_mask: torch.Tensor) -> torch.Tensor:
    """Predicted part of every point, chosen among the parts of its shape's category.

    Args:
        logits: (B, N, P) part scores.
        cls_label: (B,) category of every shape.
        part_mask: (C, P) bool from :func:`category_part_mask`.
    Returns:
        (B, N) int64 global part ids.
    """
    if logits.dim() != 3 or logits.shape[-1] != part_mask.shape[1]:
        raise ValueError(f"logits must be (B, N, P={part_mask.shape[1]}), got {tuple(logits.shape)}")
    allowed = part_mask.to(logits.device)[cls_label.long()]  # (B, P)
    masked = logits.float().masked_fill(~allowed[:, None, :], float("-inf"))
    return masked.argmax(dim=-1)


@dataclass
class PartIoU:
    """ious: (B, P) IoU of every part of the shape's category (NaN for other parts);
    shape_iou: (B,) mean over the category's parts (the per-shape mIoU)."""

    ious: torch.Tensor
    shape_iou: torch.Tensor


def part_ious(pred: torch.Tensor, target: torch.Tensor, cls_label: torch.Tensor,
              part_mask: torch.Tensor) -> PartIoU:
    """Per-part and per-shape IoU of a batch (see the module docstring for the rules).

    Args:
        pred: (B, N) predicted global part ids.
        target: (B, N) ground-truth global part ids.
        cls_label: (B,) category of every shape.
        part_mask: (C, P) bool from :func:`category_part_mask`.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be (B, N), got {tuple(pred.shape)} and {tuple(target.shape)}")
    b, _ = pred.shape
    p = part_mask.shape[1]
    device = pred.device
    offset = (torch.arange(b, device=device) * p)[:, None]  # (B, 1)

    def counts(ids: torch.Tensor) -> torch.Tensor:  # (B, N) part ids -> (B, P) point counts
        return torch.bincount((ids.long() + offset).reshape(-1), minlength=b * p).reshape(b, p)

    inter = _intersection_counts(pred, target, offset, b, p)
    union = counts(pred) + counts(target) - inter
    one = torch.ones((), dtype=torch.float64, device=device)
    iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), one)  # absent in both: 1
    allowed = part_mask.to(device)[cls_label.long()]  # (B, P)
    iou = torch.where(allowed, iou, torch.full_like(iou, float("nan")))
    shape_iou = torch.nan_to_num(iou, nan=0.0).sum(dim=1) / allowed.sum(dim=1).clamp(min=1)
    return PartIoU(iou, shape_iou)


def _intersection_counts(pred: torch.Tensor, target: torch.Tensor, offset: torch.Tensor, b: int,
                         p: int) -> torch.Tensor:
    """(B, P) number of points whose prediction and ground truth are both part p."""
    hit = (pred == target).reshape(-1).to(torch.int64)
    idx = (target.long() + offset).reshape(-1)
    return torch.zeros(b * p, dtype=torch.int64, device=pred.device).index_add_(0, idx, hit).reshape(b, p)


def summarize_shape_ious(shape_iou: torch.Tensor, cls_label: torch.Tensor,
                         category_names: Sequence[str]) -> dict[str, float]:
    """Instance mIoU, class mIoU and ``iou_<Category>`` for every category that has shapes.

    shape_iou: (S,) per-shape mIoU; cls_label: (S,) their categories.
    """
    out: dict[str, float] = {}
    if shape_iou.numel() == 0:
        return {"instance_miou": 0.0, "class_miou": 0.0}
    shape_iou = shape_iou.double().cpu()
    cls_label = cls_label.long().cpu()
    c = len(category_names)
    sums = torch.zeros(c, dtype=torch.float64).index_add_(0, cls_label, shape_iou)
    n = torch.bincount(cls_label, minlength=c)
    present = n > 0
    per_cat = sums[present] / n[present]
    out["instance_miou"] = float(shape_iou.mean())
    out["class_miou"] = float(per_cat.mean())
    for i in torch.nonzero(present).flatten().tolist():
        out[f"iou_{category_names[i]}"] = float(sums[i] / n[i])
    return out


@dataclass
class SegmentationResult:
    """metrics: instance/class mIoU, point accuracy, per-category IoU; shape_iou: (S,) of the S
    unique shapes (ascending index); cls_label: (S,); index: (S,)."""

    metrics: dict[str, float]
    shape_iou: torch.Tensor
    cls_label: torch.Tensor
    index: torch.Tensor


class SegmentationMeter:
    """Accumulates per-shape IoUs over batches; :meth:`compute` gathers them across DDP ranks and
    counts every shape once (by its dataset index).

    part_mask: (C, P) bool; category_names: C names (for the per-category metrics).
    """

    def __init__(self, part_mask: torch.Tensor, category_names: Sequence[str]) -> None:
        if part_mask.shape[0] != len(category_names):
            raise ValueError(f"{part_mask.shape[0]} categories in part_mask, {len(category_names)} names")
        self.part_mask, self.names = part_mask, list(category_names)
        self.shape_iou: list[torch.Tensor] = []
        self.cls_label: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []  # (B,) correctly labelled points per shape
        self.points: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor, cls_label: torch.Tensor,
               index: torch.Tensor | None = None) -> torch.Tensor:
        """logits: (B, N, P); target: (B, N); cls_label: (B,); index: (B,) shape ids (None:
        consecutive). Returns the (B, N) restricted predictions."""
        pred = restrict_to_category(logits, cls_label, self.part_mask)
        res = part_ious(pred, target, cls_label, self.part_mask)
        if index is None:
            start = sum(len(x) for x in self.index)
            index = torch.arange(start, start + len(cls_label), device=cls_label.device)
        self.shape_iou.append(res.shape_iou.detach())
        self.cls_label.append(cls_label.detach().long())
        self.index.append(index.detach().long())
        self.correct.append((pred == target).sum(dim=1))
        self.points.append(torch.full_like(self.correct[-1], target.shape[1]))
        return pred

    def compute(self) -> SegmentationResult:
        def cat(xs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
            t = torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)
            return all_gather_cat(t)

        iou, lab, idx = cat(self.shape_iou, torch.float64), cat(self.cls_label, torch.long), cat(self.index, torch.long)
        correct, points = cat(self.correct, torch.long), cat(self.points, torch.long)
        uniq, first = _first_occurrence(idx)
        iou, lab, correct, points = iou[first].cpu(), lab[first].cpu(), correct[first].cpu(), points[first].cpu()
        metrics = summarize_shape_ious(iou, lab, self.names)
        metrics["accuracy"] = float(correct.sum() / points.sum().clamp(min=1))
        metrics["num_samples"] = float(len(uniq))
        return SegmentationResult(metrics, iou, lab, uniq.cpu())


def _first_occurrence(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique ids ascending, position of the first occurrence of each) of a (S,) id tensor."""
    uniq, inverse = torch.unique(index, return_inverse=True)
    pos = torch.arange(len(index), device=index.device)
    first = torch.full((len(uniq),), len(index), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return uniq, first


def part_sets_for(categories: Sequence[str], seg_classes: Mapping[str, Sequence[int]]) -> list[list[int]]:
    """Part ids of every category name, in the given order (KeyError names an unknown one)."""
    out = []
    for name in categories:
        if name not in seg_classes:
            raise ValueError(f"unknown category {name!r}; known: {', '.join(seg_classes)}")
        out.append(list(seg_classes[name]))
    return out

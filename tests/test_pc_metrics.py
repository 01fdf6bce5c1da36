"""Part-segmentation metrics against hand-computed values and the official per-shape loop."""

import itertools

import numpy as np
import pytest
import torch

from mm3d.pointcloud.datasets import SHAPENETPART_CATEGORIES, SHAPENETPART_SEG_CLASSES
from mm3d.pointcloud.seg_metrics import (SegmentationMeter, category_part_mask, part_ious, part_sets_for,
                                         restrict_to_category, summarize_shape_ious)
from mm3d.testing import assert_close

CATS = list(SHAPENETPART_CATEGORIES)
MASK = category_part_mask(part_sets_for(CATS, SHAPENETPART_SEG_CLASSES), 50)
AIRPLANE, BAG, TABLE = CATS.index("Airplane"), CATS.index("Bag"), CATS.index("Table")


def official_shape_iou(pred: np.ndarray, gt: np.ndarray, parts: list[int]) -> float:
    """The per-shape loop of the official evaluation scripts (PointNet++ / Point-MAE main.py)."""
    ious = []
    for p in parts:
        if (gt == p).sum() == 0 and (pred == p).sum() == 0:
            ious.append(1.0)
        else:
            ious.append(((gt == p) & (pred == p)).sum() / float(((gt == p) | (pred == p)).sum()))
    return float(np.mean(ious))


def test_category_part_mask():
    assert MASK.shape == (16, 50)
    assert MASK.sum() == 50  # every part belongs to exactly one category
    assert (MASK.sum(dim=0) == 1).all()
    assert MASK[AIRPLANE].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert MASK[TABLE].nonzero().flatten().tolist() == [47, 48, 49]
    with pytest.raises(ValueError, match="outside"):
        category_part_mask([[0, 60]], 50)


def test_hand_computed_shape_iou():
    # Airplane (parts 0-3): gt = 0 0 1 1 1 2, pred = 0 1 1 1 0 2, part 3 absent from both
    gt = torch.tensor([[0, 0, 1, 1, 1, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    res = part_ious(pred, gt, torch.tensor([AIRPLANE]), MASK)
    # part 0: {0} / {0,1,4} = 1/3; part 1: {2,3} / {1,2,3,4} = 1/2; part 2: 1; part 3 absent in both: 1
    assert_close(res.ious[0, :4], torch.tensor([1 / 3, 0.5, 1.0, 1.0], dtype=torch.float64))
    assert torch.isnan(res.ious[0, 4:]).all()  # other categories' parts are not scored
    assert_close(res.shape_iou, torch.tensor([(1 / 3 + 0.5 + 1 + 1) / 4], dtype=torch.float64))


def test_part_only_in_prediction_scores_zero():
    # Bag (parts 4, 5): gt all part 4, prediction puts one point in part 5
    gt = torch.tensor([[4, 4, 4, 4]])
    pred = torch.tensor([[4, 4, 4, 5]])
    res = part_ious(pred, gt, torch.tensor([BAG]), MASK)
    assert_close(res.ious[0, 4:6], torch.tensor([0.75, 0.0], dtype=torch.float64))
    assert_close(res.shape_iou, torch.tensor([0.375], dtype=torch.float64))
    # perfect prediction with part 5 absent from both: IoU 1 for both parts
    assert_close(part_ious(gt, gt, torch.tensor([BAG]), MASK).shape_iou, torch.tensor([1.0], dtype=torch.float64))


def test_restriction_to_category_parts():
    logits = torch.zeros(2, 3, 50)
    logits[:, :, 10] = 5.0  # a Car part wins everywhere unrestricted
    logits[0, :, 48] = 1.0  # Table part 48 is the best Table part for shape 0
    logits[1, 0, 2] = 1.0  # Airplane: point 0 -> part 2, others tie at 0 -> lowest part id 0
    pred = restrict_to_category(logits, torch.tensor([TABLE, AIRPLANE]), MASK)
    assert pred.tolist() == [[48, 48, 48], [2, 0, 0]]
    for b, cat in enumerate([TABLE, AIRPLANE]):
        assert set(pred[b].tolist()) <= set(SHAPENETPART_SEG_CLASSES[CATS[cat]])


def test_class_and_instance_miou_hand_computed():
    shape_iou = torch.tensor([1.0, 0.5, 0.2, 0.4, 0.6])
    cls = torch.tensor([AIRPLANE, AIRPLANE, TABLE, TABLE, TABLE])
    m = summarize_shape_ious(shape_iou, cls, CATS)
    assert m["instance_miou"] == pytest.approx(2.7 / 5)
    assert m["iou_Airplane"] == pytest.approx(0.75)
    assert m["iou_Table"] == pytest.approx(0.4)
    assert m["class_miou"] == pytest.approx((0.75 + 0.4) / 2)  # categories without shapes are left out
    assert "iou_Bag" not in m


@pytest.mark.parametrize("n,seed", list(itertools.product([1, 7, 64], [0, 1, 2])))
def test_part_ious_match_official_loop(n, seed):
    g = torch.Generator().manual_seed(seed)
    b = 6
    cls = torch.randint(0, 16, (b,), generator=g)
    gt = torch.empty(b, n, dtype=torch.long)
    pred = torch.empty(b, n, dtype=torch.long)
    for i in range(b):  # random labels within the category (a part may be missing from either)
        parts = torch.tensor(SHAPENETPART_SEG_CLASSES[CATS[int(cls[i])]])
        gt[i] = parts[torch.randint(0, len(parts), (n,), generator=g)]
        pred[i] = parts[torch.randint(0, len(parts), (n,), generator=g)]
    res = part_ious(pred, gt, cls, MASK)
    expected = [official_shape_iou(pred[i].numpy(), gt[i].numpy(), SHAPENETPART_SEG_CLASSES[CATS[int(cls[i])]])
                for i in range(b)]
    assert_close(res.shape_iou, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_meter_counts_each_shape_once_and_restricts():
    meter = SegmentationMeter(MASK, CATS)
    logits = torch.randn(3, 32, 50, generator=torch.Generator().manual_seed(0))
    cls = torch.tensor([AIRPLANE, TABLE, TABLE])
    gt = torch.stack([torch.zeros(32, dtype=torch.long), torch.full((32,), 47), torch.full((32,), 49)])
    pred = meter.update(logits, gt, cls, torch.tensor([0, 1, 2]))
    meter.update(logits[1:2], gt[1:2], cls[1:2], torch.tensor([1]))  # a repeated shape (padded sampler)
    res = meter.compute()
    assert res.index.tolist() == [0, 1, 2]
    expected = [official_shape_iou(pred[i].numpy(), gt[i].numpy(), SHAPENETPART_SEG_CLASSES[CATS[int(cls[i])]])
                for i in range(3)]
    assert res.metrics["instance_miou"] == pytest.approx(np.mean(expected))
    assert res.metrics["class_miou"] == pytest.approx((expected[0] + (expected[1] + expected[2]) / 2) / 2)
    assert res.metrics["accuracy"] == pytest.approx(float((pred == gt).float().mean()))
    assert res.metrics["num_samples"] == 3


def test_shape_mismatch_errors():
    with pytest.raises(ValueError, match="pred and target"):
        part_ious(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2), MASK)
    with pytest.raises(ValueError, match="logits must be"):
        restrict_to_category(torch.zeros(2, 3, 40), torch.zeros(2, dtype=torch.long), MASK)
    with pytest.raises(ValueError, match="unknown category"):
        part_sets_for(["Boat"], SHAPENETPART_SEG_CLASSES)

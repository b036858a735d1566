"""ConfusionMatrix: hand-computed IoU / mIoU / pixel accuracy, absent classes, ignore index, 2 gloo ranks."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.metrics.segmentation import ConfusionMatrix


def test_hand_computed_case_with_an_absent_class() -> None:
    # truth:      pred:
    # 0 0 1       0 1 1
    # 1 1 2       1 1 1
    target = torch.tensor([[0, 0, 1], [1, 1, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 1, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    r = cm.compute()
    # class 0: tp 1, union 2; class 1: tp 3, union 5; class 2: tp 0, union 1; class 3: nowhere
    assert r["confusion"] == [[1, 1, 0, 0], [0, 3, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert r["iou"][:3] == pytest.approx([0.5, 0.6, 0.0])
    assert math.isnan(r["iou"][3])
    assert r["present"] == [True, True, True, False]
    assert r["miou"] == pytest.approx((0.5 + 0.6 + 0.0) / 3)
    assert r["pixel_accuracy"] == pytest.approx(4 / 6)


def test_class_only_predicted_counts_as_present_with_zero_iou() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([2, 2, 0]), torch.tensor([0, 0, 0]))
    r = cm.compute()
    assert r["iou"][0] == pytest.approx(1 / 3) and r["iou"][2] == 0.0 and math.isnan(r["iou"][1])
    assert r["present"] == [True, False, True]
    assert r["miou"] == pytest.approx(1 / 6)


def test_updates_accumulate_and_ignore_index_is_skipped() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 255]]))
    cm.update(torch.tensor([1, 1]), torch.tensor([1, 0]))
    r = cm.compute()
    assert r["confusion"] == [[1, 1], [0, 1]]
    assert r["pixel_accuracy"] == pytest.approx(2 / 3)
    assert r["iou"] == pytest.approx([0.5, 0.5])


def test_empty_matrix_and_bad_input() -> None:
    r = ConfusionMatrix(2).compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_accuracy"]) and r["present"] == [False, False]
    cm = ConfusionMatrix(2, ignore_index=None)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([255]))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_reduce_without_process_group_keeps_the_counts() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    cm.reduce_from_all_processes()
    assert cm.compute()["confusion"] == [[1, 1], [0, 1]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = torch.load(Path(out_dir) / "data.pt")
        cm = ConfusionMatrix(5)
        for pred, target in zip(data["pred"][rank::world], data["target"][rank::world], strict=True):
            cm.update(pred, target)
        cm.reduce_from_all_processes()
        torch.save(cm.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (7, 8, 8), generator=gen)  # 7 masks: ranks take 4 and 3; class 4 absent
    pred = torch.where(torch.rand(7, 8, 8, generator=gen) < 0.7, target, torch.randint(0, 4, (7, 8, 8), generator=gen))
    torch.save({"pred": pred, "target": target}, tmp_path / "data.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix(5)
    single.update(pred, target)
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["confusion"] == expected["confusion"]
        assert got["present"] == expected["present"] == [True, True, True, True, False]
        assert got["miou"] == expected["miou"]
        assert got["pixel_accuracy"] == expected["pixel_accuracy"]

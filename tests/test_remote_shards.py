"""Shards streamed from object storage: ``s3://`` from a local S3 server, ``pipe:`` commands, clear errors."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from pipeline.data import storage
from pipeline.data.loaders import eval_batches, train_batches
from pipeline.data.shards import ShardError, load_manifest
from pipeline.errors import UserError

if TYPE_CHECKING:
    from tests.team_stack import S3Server

pytest_plugins = ["tests.team_stack"]


def _same_batches(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _train(root: str | Path, num_workers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = train_batches(
        root, "patches", "train", 8, 3, rank=1, world_size=2, num_workers=num_workers, seed=5, epoch=1
    )
    return list(batches)


def _eval(root: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(eval_batches(root, "mosaics", "val", 4, rank=0, world_size=1))


def test_join_places_the_file_under_each_kind_of_root() -> None:
    assert storage.join("data/shards", "manifest.json") == "data/shards/manifest.json"
    assert storage.join("s3://bucket/shards/", "patches/a.tar") == "s3://bucket/shards/patches/a.tar"
    assert storage.join("pipe:cat /x/{} | head", "m.json") == "pipe:cat /x/m.json | head"
    with pytest.raises(storage.StorageError, match=r"pipe:cat /x: a pipe: shard root needs '\{\}'"):
        storage.join("pipe:cat /x", "m.json")


def test_pipe_root_streams_the_same_batches_as_the_directory(tiny_shards: Path) -> None:
    root = f"pipe:cat {shlex.quote(str(tiny_shards))}/{{}}"
    assert load_manifest(root) == load_manifest(tiny_shards)
    _same_batches(_train(root), _train(tiny_shards))
    _same_batches(_eval(root), _eval(tiny_shards))


def test_failing_pipe_command_is_one_line_naming_the_file(tiny_shards: Path) -> None:
    root = f"pipe:cat {tiny_shards}/{{}} && test {{}} = manifest.json"  # every shard read fails
    with pytest.raises(ShardError, match=r"^pipe:cat .*/patches/train-\d+\.tar && .*: command exited with 1"):
        _train(root)


@pytest.mark.slow
def test_s3_root_streams_the_same_batches_as_the_directory(
    tiny_shards: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.create_bucket("remote-shards")
    client = s3_server.client()
    for path in sorted(p for p in tiny_shards.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"v1/{path.relative_to(tiny_shards).as_posix()}")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # how boto3 finds MinIO or any S3-compatible server

    root = f"s3://{bucket}/v1"
    assert load_manifest(root) == load_manifest(tiny_shards)
    _same_batches(_train(root, num_workers=1), _train(tiny_shards))  # a forked loader worker reads S3 too
    _same_batches(_eval(root), _eval(tiny_shards))

    client.delete_object(Bucket=bucket, Key="v1/mosaics/val-000000.tar")
    with pytest.raises(ShardError, match=rf"^s3://{bucket}/v1/mosaics/val-000000.tar: S3 said NoSuchKey$"):
        _eval(root)
    with pytest.raises(UserError, match=rf"^s3://{bucket}/nothing/manifest.json: S3 said NoSuchKey$"):
        load_manifest(f"s3://{bucket}/nothing")

"""Where shards are read from: a local directory, an S3 prefix, an HTTP(S) prefix, or any shell command.

A *shard root* names the directory that holds ``manifest.json`` and the ``patches/`` and ``mosaics/`` tars:

- ``data/shards`` (a local path, the default);
- ``s3://bucket/prefix``: read with boto3, so credentials and the endpoint come from the usual AWS
  environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO or
  another S3-compatible server), never from ``params.yaml``;
- ``https://host/prefix`` (or ``http://``): plain GET requests;
- ``pipe:COMMAND``: a shell command that writes one file to stdout, ``{}`` standing for the file's path
  under the root, as in webdataset's ``pipe:`` URLs (e.g. ``pipe:aws s3 cp s3://bucket/shards/{} -`` or
  ``pipe:gsutil cat gs://bucket/shards/{}``).

Shards are small (``data.shard_max_samples``) and read whole, so one ``read_bytes`` per shard is the
whole protocol.
"""

from __future__ import annotations

import functools
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.errors import UserError, one_line

PIPE, S3, HTTP = "pipe:", "s3://", ("http://", "https://")
REMOTE = (PIPE, S3, *HTTP)
HTTP_TIMEOUT_S = 60


class StorageError(UserError):
    """A shard root or file that cannot be read; the message names it."""


def is_local(root: str | Path) -> bool:
    return not str(root).startswith(REMOTE)


def join(root: str | Path, name: str) -> str:
    """The location of ``name`` (``manifest.json``, ``patches/train-000000.tar``) under a shard root."""
    text = str(root)
    if text.startswith(PIPE):
        if "{}" not in text:
            raise StorageError(f"{root}: a pipe: shard root needs '{{}}' where the file's path goes")
        return text.replace("{}", name)
    if not is_local(text):
        return text.rstrip("/") + "/" + name
    return str(Path(text) / name)


def read_bytes(location: str) -> bytes:
    """The whole file at ``location`` (as returned by :func:`join`); :class:`StorageError` naming it otherwise."""
    try:
        if location.startswith(PIPE):
            return _run_pipe(location)
        if location.startswith(S3):
            return _read_s3(location)
        if location.startswith(HTTP):
            with urllib.request.urlopen(location, timeout=HTTP_TIMEOUT_S) as response:
                return response.read()
        return Path(location).read_bytes()
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{location}: not found") from None
    except (OSError, urllib.error.URLError) as exc:
        raise StorageError(f"{location}: cannot read ({one_line(exc)})") from None


def _run_pipe(location: str) -> bytes:
    command = location[len(PIPE) :]
    result = subprocess.run(command, shell=True, capture_output=True, check=False)
    if result.returncode != 0:
        tail = " ".join(result.stderr.decode(errors="replace").split())[-300:]
        raise StorageError(f"{location}: command exited with {result.returncode} ({tail or 'no error output'})")
    return result.stdout


def _read_s3(location: str) -> bytes:
    bucket, _, key = location[len(S3) :].partition("/")
    if not bucket or not key:
        raise StorageError(f"{location}: expected s3://bucket/key")
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise StorageError(f"{location}: s3:// shards need boto3 (pip install 'texture-pipeline[team]')") from None
    try:
        return _s3_client(os.getpid()).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StorageError(f"{location}: S3 said {code}") from None
    except BotoCoreError as exc:
        raise StorageError(f"{location}: {exc}") from None


@functools.cache
def _s3_client(pid: int) -> Any:
    """One boto3 client per process (DataLoader workers are forked; a client must not cross a fork)."""
    import boto3

    return boto3.session.Session().client("s3")

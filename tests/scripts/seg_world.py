"""Entry point for tests/test_train_segmenter.py: segmenter steps on fixed global batches, sliced per rank.

``python seg_world.py PARAMS SHARDS OUT_DIR STEPS`` (plain: world size 1; under torchrun: any world size).
Every step takes the next ``segmenter.batch_size`` train mosaics in manifest order; rank r trains on rows
[r * b, (r + 1) * b) of it. Then the test split is evaluated across ranks and, on rank 0 alone, in one process.
Rank 0 writes ``OUT_DIR/losses.json`` (step terms), ``OUT_DIR/confusion.json`` (distributed and single-process
confusion matrices) and the final weights ``OUT_DIR/model.pt``.
"""

import json
import sys
from itertools import islice
from pathlib import Path

import torch

from pipeline import config
from pipeline.data.loaders import eval_batches
from pipeline.data.shards import load_manifest
from pipeline.distributed import distributed, plain_module
from pipeline.training.segmenter import SegmenterStep, build_model, evaluate

params, shards, out, steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
cfg = config.load(params)
s = cfg.segmenter
num_classes = len(load_manifest(shards)["classes"])
with distributed(cfg.train) as env:
    local = s.batch_size // env.world_size
    model, optimizer = build_model(s, num_classes, env, cfg.seed, cfg.train.channels_last)
    step_fn = SegmenterStep(s, model, optimizer, env, steps, cfg.train.channels_last)
    batches = eval_batches(shards, "mosaics", "train", s.batch_size, rank=0, world_size=1)
    terms = []
    for step, (images, masks) in enumerate(islice(batches, steps)):
        rows = slice(env.rank * local, (env.rank + 1) * local)
        terms.append(step_fn(step, images[rows], masks[rows]))
    spread = evaluate(model, shards, "test", local, num_classes, env)
    if env.is_main:
        alone = evaluate(model, shards, "test", s.batch_size, num_classes)
        matrices = {"distributed": spread["confusion"], "single": alone["confusion"]}
        (out / "confusion.json").write_text(json.dumps(matrices))
        (out / "losses.json").write_text(json.dumps(terms))
        torch.save(plain_module(model).state_dict(), out / "model.pt")

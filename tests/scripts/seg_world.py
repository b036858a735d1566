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
from pipeline.distributed import all_reduce_mean, distributed, plain_module
from pipeline.evaluation.segmenter import split_confusion
from pipeline.metrics.segmentation import ConfusionMatrix
from pipeline.training.segmenter import SegmenterStep, build_model

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
        terms.append(all_reduce_mean(step_fn(step, images[rows], masks[rows]), env.device))
    net = plain_module(model)
    spread = split_confusion(model, shards, "test", local, env, {"single": net.logits})["single"].compute()
    if env.is_main:  # this process alone, no collective: every test mosaic through the same weights
        net.eval()
        alone = ConfusionMatrix(num_classes)
        with torch.no_grad():
            for images, masks in eval_batches(shards, "mosaics", "test", s.batch_size, rank=0, world_size=1):
                alone.update(net.logits(images).argmax(1), masks)
        matrices = {"distributed": spread["confusion"], "single": alone.compute()["confusion"]}
        (out / "confusion.json").write_text(json.dumps(matrices))
        (out / "losses.json").write_text(json.dumps(terms))
        torch.save(plain_module(model).state_dict(), out / "model.pt")

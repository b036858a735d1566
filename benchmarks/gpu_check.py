"""GPU check (issue 23): what the pipeline gets from this machine's NVIDIA GPUs, in about 5 minutes, as Markdown.

    bash benchmarks/gpu_check.sh [--params params.yaml] [--out FILE] [--cpu-smoke]      (or: make gpu-check)

Sections, measured on ``--params`` with the check's profile on top (:func:`gpu_profile`: ``gan.batch_size``
256, ``gan.channels`` 64, ``segmenter.batch_size`` 128, ``segmenter.channels`` 32, ``train.precision`` auto):

- the devices (name, compute capability, memory) and the precision ``train.precision: auto`` picks on each;
- NCCL all-reduce of float32 buffers up to 256 MiB over every local GPU (torchrun), with the bus bandwidth
  as nccl-tests define it: busbw = 2 (n - 1) / n x bytes / time;
- GAN and segmenter training steps/s (the tasks' steps on an in-memory batch, metrics averaged over ranks as the
  loop does) on 1 GPU and on all GPUs at the same global batch: speed-up and scaling efficiency (speed-up / n);
  peak GPU memory per rank (``torch.cuda.max_memory_allocated``, weights and optimiser state included);
- the GAN step on 1 GPU with ``train.compile`` false and true (warm-up steps first: compiling is timed apart);
- ``data_wait`` (the loop's share of wall time spent waiting for the next batch) of a short real ``train_gan``
  run through ``python -m pipeline.launch`` on all GPUs, on small shards prepared with ``data.encoding`` png and
  raw (``history.csv``'s log windows, the first one, which holds the start-up, left out).

The report goes to stdout (and to ``--out``); progress and failures to stderr, a failed section's log is kept
under the work directory. Without a GPU: one line, exit status 0. ``--cpu-smoke`` runs every path on the CPU
(gloo, 2 ranks, tiny params, ``torch.compile`` switched off by ``TORCH_COMPILE_DISABLE=1``): a test of this
code, not a measurement. Nothing is installed or downloaded: the check uses the Python it runs under.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

import gan_step
import scaling
from report import machine

from pipeline import config
from pipeline.checkpoint import atomic_write_json, atomic_write_text
from pipeline.config import Config
from pipeline.distributed import DistEnv, all_gather_cat, all_reduce_mean, distributed, resolve_precision
from pipeline.errors import main_entry
from pipeline.models.features import TextureFeatureNet, save_feature_extractor
from pipeline.training.segmenter import SegmenterStep, build_model

ROOT = Path(__file__).resolve().parents[1]
ENCODINGS = ("png", "raw")
MIB = 2**20
SMOKE_RANKS = 2


@dataclass(frozen=True)
class Profile:
    """Params on top of ``--params`` and the sizes of the measurements."""

    overrides: dict[str, Any]
    nproc: int  # ranks of the "all devices" measurements
    warmup: int  # steps before timing (cuDNN's autotuning, torch.compile)
    steps: int  # timed steps
    allreduce_mib: tuple[float, ...]
    allreduce_iters: int
    timeout_s: int  # per launched process
    launch_env: dict[str, str] = field(default_factory=dict)


def _multiple(value: int, of: int) -> int:
    return -(-value // of) * of


def gpu_profile(gpus: int, num_workers: int) -> Profile:
    """GPU-sized params, bounded in time: global batches that split over ``gpus`` ranks (GAN: in row pairs), and a
    400-step train_gan run that validates only at its start and end (so no log window holds a validation)."""
    run_steps = 400
    return Profile(
        overrides={
            "train.device": "cuda",
            "train.precision": "auto",
            "train.compile": False,
            "train.max_restarts": 0,
            "gan.batch_size": _multiple(256, 2 * gpus),
            "gan.channels": 64,
            "gan.steps": run_steps,
            "gan.log_every": 25,
            "gan.eval_every": run_steps,
            "gan.checkpoint_every": run_steps,
            "gan.sample_every": run_steps,
            "gan.eval_samples": 500,
            "segmenter.batch_size": _multiple(128, gpus),
            "segmenter.channels": 32,
            "data.mosaics": {"train": 64, "val": 16, "test": 16},  # train_gan reads patches only
            "data.min_shards": max(4, gpus * max(1, num_workers)),
            "mlflow.system_metrics": False,
        },
        nproc=gpus,
        warmup=5,
        steps=100,
        allreduce_mib=(1, 16, 64, 256),
        allreduce_iters=20,
        timeout_s=240,
    )


SMOKE = Profile(
    overrides={
        "train.device": "cpu",
        "train.precision": "auto",
        "train.compile": False,
        "train.max_restarts": 0,
        "train.num_workers": 0,
        "data.classes": ["stripes", "checker", "dots", "brick"],
        "data.instances_per_class": 6,
        "data.source_size": 64,
        "data.patch_size": 16,
        "data.patches_per_source": 8,
        "data.mosaic_size": 32,
        "data.max_regions": 3,
        "data.mosaics": {"train": 16, "val": 8, "test": 8},
        "data.shard_max_samples": 8,
        "data.min_shards": 2,
        "gan.z_dim": 16,
        "gan.channels": 16,
        "gan.batch_size": 8,
        "gan.steps": 6,
        "gan.log_every": 2,
        "gan.eval_every": 6,
        "gan.checkpoint_every": 6,
        "gan.sample_every": 6,
        "gan.eval_samples": 16,
        "segmenter.channels": 8,
        "segmenter.depth": 2,
        "segmenter.batch_size": 8,
        "evaluate.feature_dim": 16,
        "mlflow.system_metrics": False,
    },
    nproc=SMOKE_RANKS,
    warmup=1,
    steps=2,
    allreduce_mib=(0.25, 1),
    allreduce_iters=3,
    timeout_s=120,
    launch_env={"TORCH_COMPILE_DISABLE": "1", "OMP_NUM_THREADS": "1"},
)


class SectionFailed(Exception):
    """A measurement that did not complete; the message says why and where its log is."""


# ----------------------------------------------------------------------------------------------- in the ranks


def bus_bandwidth(nbytes: float, seconds: float, ranks: int) -> float:
    """All-reduce bus bandwidth in bytes/s (nccl-tests): each byte crosses 2 (n - 1) / n links of the ring."""
    return 2 * (ranks - 1) / ranks * nbytes / seconds


def allreduce_seconds(env: DistEnv, mib: float, iters: int, warmup: int = 3) -> float:
    """Seconds per all-reduce (sum) of a float32 buffer of ``mib`` MiB across the job."""
    x = torch.zeros(int(mib * MIB) // 4, device=env.device)
    for _ in range(warmup):
        dist.all_reduce(x)
    scaling._synchronize(env.device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    scaling._synchronize(env.device)
    return (time.perf_counter() - start) / iters


def segmenter_step(cfg: Config, env: DistEnv) -> Callable[[int], None]:
    """The segmenter's step as the loop runs it (:class:`SegmenterStep`, then its metrics averaged over the
    ranks) on one fixed batch of this rank's ``segmenter.batch_size / world_size`` mosaics; the task's host-side
    augmentation is not part of it."""
    s, size, classes = cfg.segmenter, cfg.data.mosaic_size, gan_step.NUM_CLASSES
    model, optimizer = build_model(s, classes, env, cfg.seed, cfg.train.channels_last, cfg.train.compile)
    step_fn = SegmenterStep(s, model, optimizer, env, s.epochs * s.steps_per_epoch, cfg.train.channels_last)
    rows = s.batch_size // env.world_size
    gen = torch.Generator().manual_seed(env.rank)
    images = torch.rand(rows, 3, size, size, generator=gen)
    masks = torch.randint(0, classes, (rows, size, size), generator=gen)
    if env.device.type == "cuda":
        images, masks = images.pin_memory(), masks.pin_memory()

    def step(i: int) -> None:
        all_reduce_mean(step_fn(i, images, masks), env.device)

    return step


def peak_memory_mib(env: DistEnv) -> list[float]:
    """Every rank's peak memory in MiB: ``torch.cuda.max_memory_allocated`` since the last reset on CUDA, the
    process's maximum resident set on the CPU."""
    if env.device.type == "cuda":
        local = torch.cuda.max_memory_allocated(env.device) / MIB
    else:
        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return all_gather_cat(torch.tensor([local], dtype=torch.float64, device=env.device)).tolist()


def time_steps(build: Callable[[], Callable[[int], None]], env: DistEnv, warmup: int, steps: int) -> dict[str, Any]:
    """Steps/s of ``build()``'s step after ``warmup`` steps (their seconds apart), and the peak memory per rank."""
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    step = build()
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    scaling._synchronize(env.device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    scaling._synchronize(env.device)
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "warmup_s": warmup_s, "peak_mib": peak_memory_mib(env)}


def worker(params: Path, spec: dict[str, Any], result: Path) -> None:
    """One rank of a measurement job (under torchrun); rank 0 writes the job's figures to ``result``."""
    cfg = config.load(params)
    with distributed(cfg.train) as env:
        out: dict[str, Any] = {"world_size": env.world_size}
        if env.distributed:
            out["allreduce"] = [
                {"mib": mib, "seconds": allreduce_seconds(env, mib, spec["allreduce_iters"])}
                for mib in spec["allreduce_mib"]
            ]
        builds = {"gan": lambda: gan_step.trainer_step(cfg, env)[0], "segmenter": lambda: segmenter_step(cfg, env)}
        if spec["compile"]:
            builds["gan_compiled"] = lambda: gan_step.trainer_step(cfg, env, compiled=True)[0]
        for name, build in builds.items():
            out[name] = time_steps(build, env, spec["warmup"], spec["steps"])
        if env.is_main:
            atomic_write_json(result, out)


# ------------------------------------------------------------------------------------------ the orchestrator


def write_params(base: Path, overrides: dict[str, Any], path: Path) -> Path:
    """``base`` with ``overrides`` applied, validated, written to ``path``."""
    raw = config.load_raw(base)
    for key, value in overrides.items():
        config.set_dotted(raw, key, value)
    config.parse(raw, str(base))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return path


def run_logged(cmd: list[str], log: Path, timeout: int, env: dict[str, str]) -> None:
    """Run ``cmd`` from the repo root, its output into ``log``; killed with its process group past ``timeout``."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SectionFailed(f"timed out after {timeout} s (log: {log})") from None
    if status:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        raise SectionFailed(f"exit status {status} (log: {log}): {tail[-400:]}")


def child_env(profile: Profile, nproc: int) -> dict[str, str]:
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    return os.environ | {"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"} | profile.launch_env


def measure_steps(params: Path, profile: Profile, nproc: int, work: Path, compile_too: bool) -> dict[str, Any]:
    """One torchrun job of ``nproc`` ranks: all-reduce (when several), GAN and segmenter steps/s, peak memory."""
    result = work / f"steps-{nproc}.json"
    spec = {
        "warmup": profile.warmup,
        "steps": profile.steps,
        "allreduce_mib": list(profile.allreduce_mib),
        "allreduce_iters": profile.allreduce_iters,
        "compile": compile_too,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [__file__, "--worker", "--params", str(params), "--spec", json.dumps(spec), "--result", str(result)]
    run_logged(cmd, work / f"steps-{nproc}.log", profile.timeout_s, child_env(profile, nproc))
    return json.loads(result.read_text())


def data_wait_run(base: Path, profile: Profile, encoding: str, work: Path) -> dict[str, Any]:
    """Prepare shards in ``encoding``, then a short train_gan run on ``profile.nproc`` ranks; its log windows."""
    d = work / f"train-{encoding}"
    params = write_params(base, profile.overrides | {"data.encoding": encoding}, d / "params.yaml")
    cfg, env = config.load(params), child_env(profile, profile.nproc)
    shards = d / "shards"
    start = time.perf_counter()
    run_logged(
        [sys.executable, "stages/prepare.py", "--params", str(params), "--out", str(shards), "--no-progress"],
        d / "prepare.log", profile.timeout_s, env,
    )  # fmt: skip
    prepare_s = time.perf_counter() - start
    manifest = json.loads((shards / "manifest.json").read_text())
    features = d / "extractor.pt"  # untrained: the run's val FID only has to be computed, not meaningful
    torch.manual_seed(0)
    classes = manifest["classes"]
    save_feature_extractor(features, TextureFeatureNet(len(classes), cfg.evaluate.feature_dim), {"classes": classes})
    cmd = [sys.executable, "-m", "pipeline.launch", "--nproc", str(profile.nproc), "--max-restarts", "0"]
    cmd += ["stages/train_gan.py", "--params", str(params), "--shards", str(shards), "--features", str(features)]
    cmd += ["--out", str(d / "gan"), "--checkpoints", str(d / "checkpoints")]
    start = time.perf_counter()
    run_logged(cmd, d / "train.log", profile.timeout_s, env | {"MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"})
    train_s = time.perf_counter() - start
    with (d / "gan" / "history.csv").open() as f:
        windows = [row for row in csv.DictReader(f) if row.get("data_wait")][1:]
    if not windows:
        raise SectionFailed(f"{d / 'gan' / 'history.csv'}: no log window after the first")
    waits = [float(r["data_wait"]) for r in windows]
    train = manifest["splits"]["train"]["patches"]
    return {
        "encoding": encoding,
        "train_mib": sum(s["bytes"] for s in train["shards"]) / MIB,
        "windows": len(windows),
        "data_wait": {"median": statistics.median(waits), "min": min(waits), "max": max(waits)},
        "samples_per_s": statistics.median(float(r["samples_per_s"]) for r in windows),
        "steps": cfg.gan.steps,
        "batch_size": cfg.gan.batch_size,
        "num_workers": cfg.train.num_workers,
        "prepare_s": prepare_s,
        "train_s": train_s,
    }


def devices(cfg: Config) -> list[dict[str, Any]]:
    """Name, capability, memory and the ``auto`` precision of each GPU (of the CPU in the smoke)."""
    if cfg.train.device == "cpu":
        cpu = torch.device("cpu")
        bf16 = resolve_precision("auto", cpu) is not None
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "cpu")
        capability = f"{os.cpu_count()} cores, {'native' if bf16 else 'no'} bf16"
        return [{"name": model, "capability": capability, "memory_gib": memory / 2**30, "auto": _name(cpu)}]
    rows = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        rows.append(
            {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": p.total_memory / 2**30,
                "auto": _name(torch.device("cuda", i)),
            }
        )
    return rows


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _name(device: torch.device) -> str:
    dtype = resolve_precision("auto", device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + GradScaler"}[dtype]


def run_check(base: Path, profile: Profile, work: Path) -> dict[str, Any]:
    """Every section; a failed one is recorded as ``{"error": ...}`` and the others still run."""
    params = write_params(base, profile.overrides, work / "params.yaml")
    cfg = config.load(params)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "versions": f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
        + (f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if torch.cuda.is_available() else ""),
        "params": str(base),
        "profile": {k: profile.overrides[k] for k in PROFILE_SHOWN},
        "nproc": profile.nproc,
        "unit": "CPU rank" if cfg.train.device == "cpu" else "GPU",
        "devices": devices(cfg),
    }

    n = profile.nproc
    sections: list[tuple[str, str, Callable[[], Any]]] = []
    if n > 1:
        what = f"all-reduce, GAN and segmenter steps on {n} ranks"
        sections.append(("steps_n", what, lambda: measure_steps(params, profile, n, work, compile_too=False)))
    what = "GAN and segmenter steps on 1 rank, the GAN compiled and not"
    sections.append(("steps_1", what, lambda: measure_steps(params, profile, 1, work, compile_too=True)))
    for encoding in ENCODINGS:
        what = f"train_gan on {n} ranks with {encoding} shards"
        sections.append((f"data_wait_{encoding}", what, lambda e=encoding: data_wait_run(base, profile, e, work)))
    for name, what, measure in sections:
        print(f"gpu_check: {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result[name] = measure()
        except SectionFailed as exc:
            result[name] = {"error": str(exc)}
            print(f"gpu_check: {what} failed: {exc}", file=sys.stderr, flush=True)
        print(f"gpu_check: {what}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


PROFILE_SHOWN = (
    "gan.batch_size",
    "gan.channels",
    "segmenter.batch_size",
    "segmenter.channels",
    "train.precision",
)


# --------------------------------------------------------------------------------------------------- report


def _mib(values: list[float]) -> str:
    """Per-rank MiB, rank 0 first."""
    return ", ".join(f"{v:.0f}" for v in values)


def _failed(part: dict[str, Any]) -> str | None:
    return part.get("error")


def markdown(r: dict[str, Any]) -> str:
    """The report: one table per section; a failed section says why in place of its table."""
    unit, n = r["unit"], r["nproc"]
    units = f"{n} {unit}" + ("s" if n > 1 else "")
    memory = "peak MiB per rank (max_memory_allocated)" if unit == "GPU" else "peak MiB per rank (max RSS)"
    profile = ", ".join(f"{k} {v}" for k, v in r["profile"].items())
    out = [
        f"## GPU check, {r['date']}: {r['machine']}",
        "",
        f"{r['versions']}; `{r['params']}` with {profile}.",
        "",
        "### Devices",
        "",
        "| # | name | capability | memory GiB | train.precision auto |",
        "|---|---|---|---|---|",
        *(
            f"| {i} | {d['name']} | {d['capability']} | {d['memory_gib']:.1f} | {d['auto']} |"
            for i, d in enumerate(r["devices"])
        ),
        "",
        f"### All-reduce bus bandwidth, {units} (torchrun, float32, sum)",
        "",
    ]
    many = r.get("steps_n")
    if many is None:
        out.append(f"One {unit}: nothing to all-reduce between devices.")
    elif _failed(many):
        out.append(f"Failed: {_failed(many)}")
    else:
        out += ["| size MiB | time ms | algbw GB/s | busbw GB/s |", "|---|---|---|---|"]
        for a in many["allreduce"]:
            nbytes, s = a["mib"] * MIB, a["seconds"]
            out.append(
                f"| {a['mib']:g} | {s * 1e3:.3f} | {nbytes / s / 1e9:.2f} | {bus_bandwidth(nbytes, s, n) / 1e9:.2f} |"
            )
    one = r["steps_1"]
    out += ["", f"### Training steps/s, 1 {unit} and {units} at the same global batch", ""]
    if _failed(one):
        out.append(f"Failed: {_failed(one)}")
    else:
        out += [
            f"| step | global batch | 1 {unit} | {units} | speed-up | scaling efficiency | {memory}, 1 / {n} |",
            "|---|---|---|---|---|---|---|",
        ]
        batches = {"gan": r["profile"]["gan.batch_size"], "segmenter": r["profile"]["segmenter.batch_size"]}
        for name, batch in batches.items():
            a = one[name]
            if many is None or _failed(many):
                b, speedup, eff, mem = "-", "-", "-", _mib(a["peak_mib"])
            else:
                m = many[name]
                up = m["steps_per_s"] / a["steps_per_s"]
                b, speedup, eff = f"{m['steps_per_s']:.1f}", f"{up:.2f}x", f"{up / n:.0%}"
                mem = f"{_mib(a['peak_mib'])} / {_mib(m['peak_mib'])}"
            out.append(f"| {name} | {batch} | {a['steps_per_s']:.1f} | {b} | {speedup} | {eff} | {mem} |")
        eager, compiled = one["gan"], one["gan_compiled"]
        out += [
            "",
            f"### torch.compile, GAN step on 1 {unit}",
            "",
            f"| train.compile | steps/s | warm-up s | {memory} |",
            "|---|---|---|---|",
            f"| false | {eager['steps_per_s']:.1f} | {eager['warmup_s']:.1f} | {_mib(eager['peak_mib'])} |",
            f"| true | {compiled['steps_per_s']:.1f} | {compiled['warmup_s']:.1f} | {_mib(compiled['peak_mib'])} |",
            "",
            f"true / false: {compiled['steps_per_s'] / eager['steps_per_s']:.2f}x steps/s"
            + (" (smoke: TORCH_COMPILE_DISABLE=1, nothing compiled)." if unit != "GPU" else "."),
        ]
    out += [
        "",
        f"### data_wait, train_gan through `python -m pipeline.launch` on {units}",
        "",
        "| data.encoding | train patches MiB | data_wait median (min-max) | samples/s median | log windows "
        "| steps x batch | loader workers per rank | prepare s | train_gan s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for encoding in ENCODINGS:
        w = r[f"data_wait_{encoding}"]
        if _failed(w):
            out.append(f"| {encoding} | failed: {_failed(w)} | | | | | | | |")
            continue
        dw = w["data_wait"]
        out.append(
            f"| {encoding} | {w['train_mib']:.1f} | {dw['median']:.2f} ({dw['min']:.2f}-{dw['max']:.2f}) "
            f"| {w['samples_per_s']:.0f} | {w['windows']} | {w['steps']} x {w['batch_size']} | {w['num_workers']} "
            f"| {w['prepare_s']:.0f} | {w['train_s']:.0f} |"
        )
    return "\n".join(out) + "\n"


def no_gpu_line() -> str:
    hint = "; nvidia-smi is present: this torch is not a CUDA build" if shutil.which("nvidia-smi") else ""
    return f"gpu_check: no NVIDIA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}){hint}"


@main_entry("gpu_check")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", type=Path, default=Path(config.PARAMS_FILE), help="base params (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="also write the report here (e.g. benchmarks/gpu_check.md)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep shards, runs and logs here (default: a temp dir)")
    parser.add_argument("--cpu-smoke", action="store_true", help="every path on the CPU with tiny params (a test)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        worker(ns.params, ns.spec, ns.result)
        return 0
    if not ns.cpu_smoke and not torch.cuda.is_available():
        print(no_gpu_line())
        return 0
    if ns.cpu_smoke:
        profile = SMOKE
    else:
        profile = gpu_profile(torch.cuda.device_count(), config.load(ns.params).train.num_workers)
    work = ns.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run_check(ns.params.resolve(), profile, work.resolve())
    text = markdown(result)
    print(text, end="")
    if ns.out:
        atomic_write_text(ns.out, text)
    if ns.json:
        atomic_write_json(ns.json, result)
    failed = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    if failed:
        print(f"gpu_check: {len(failed)} section(s) failed ({', '.join(failed)}); logs kept in {work}", file=sys.stderr)
        return 1
    if ns.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

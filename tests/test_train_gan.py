"""GAN trainer: every loss trains, updates stay separate, and under real torchrun/gloo processes the math is
the same for world size 1 and 2, a stopped or killed run resumes exactly, and MLflow holds one clean run."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline import checkpoint, config
from pipeline.data.shards import npy_bytes
from pipeline.distributed import DistEnv
from pipeline.engine import EXIT_STOPPED
from pipeline.models.features import TextureFeatureNet, save_feature_extractor
from pipeline.models.gan import load_generator
from pipeline.tracking import stage_params
from pipeline.training.gan import SECTIONS, GanTask, build_models, train_gan
from pipeline.training.gan_loss import GanStep, VaeStep, d_class_loss, g_class_loss, mode_seeking_loss
from tests import processes
from tests.conftest import ROOT, write_params

STAGE = ROOT / "stages" / "train_gan.py"
CPU = DistEnv(0, 1, 0, torch.device("cpu"), "gloo", None)
WEIGHTS = ("g", "d", "g_ema")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread here and in the stage processes: tiny models gain nothing from more, and on a busy
    2-core box spinning OpenMP threads slow them down many times over."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractor(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained (seeded) texture feature net: enough to exercise the val FID plumbing."""
    classes = json.loads((tiny_shards / "manifest.json").read_text())["classes"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("features") / "extractor.pt"
    save_feature_extractor(path, TextureFeatureNet(len(classes), 16), {"classes": classes})
    return path


def _stage_args(work: Path, shards: Path, features: Path) -> list[str]:
    return [
        "--params", str(work / "params.yaml"),
        "--shards", str(shards),
        "--features", str(features),
        "--out", str(work / "out"),
        "--checkpoints", str(work / "ckpt"),
    ]  # fmt: skip


def _command(work: Path, shards: Path, features: Path, nproc: int | None, restarts: int = 0) -> list[str]:
    """The stage as one plain process (``nproc=None``) or under torchrun through ``pipeline.launch``."""
    if nproc is None:
        return [sys.executable, str(STAGE), *_stage_args(work, shards, features)]
    launch = [sys.executable, "-m", "pipeline.launch", "--nproc", str(nproc), "--max-restarts", str(restarts)]
    return [*launch, str(STAGE), *_stage_args(work, shards, features)]


def _wait_for(predicate: Any, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "process ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _checkpoint_step(path: Path) -> int:
    try:
        return int(checkpoint.load(path)["step"])
    except checkpoint.CheckpointError:
        return -1


def _constant_shards(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose train patches are all the first train patch, class 0 (``png`` or ``raw`` shards).

    The loaders deliberately give each rank different shards, so only data that looks the same from
    every rank makes the global batch identical for world size 1 and 2.
    """
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    first: dict[str, Any] = {}

    def constant(name: str, data: bytes) -> bytes:
        if name.endswith(".png"):
            return first.setdefault("png", data)
        if name.endswith(".cls"):
            return b"0"
        if name.endswith("images.npy"):
            images = np.load(io.BytesIO(data))
            return npy_bytes(np.broadcast_to(first.setdefault("image", images[0]), images.shape).copy())
        if name.endswith("labels.npy"):
            return npy_bytes(np.zeros_like(np.load(io.BytesIO(data))))
        return data

    for entry in manifest["splits"]["train"]["patches"]["shards"]:
        path = dst / entry["file"]
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for member, data in members:
                data = constant(member.name, data)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        blob = buffer.getvalue()
        path.write_bytes(blob)
        entry["sha256"], entry["bytes"] = hashlib.sha256(blob).hexdigest(), len(blob)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _tiny_step(overrides: dict[str, Any], tmp_path: Path) -> tuple[GanStep, Any, list]:
    cfg = config.load(write_params(tmp_path, overrides))
    models = build_models(cfg.gan, 4, cfg.data.patch_size, CPU, cfg.train.channels_last, cfg.seed)
    gen = torch.Generator().manual_seed(0)
    reals = [
        (
            torch.rand(cfg.gan.batch_size, 3, 16, 16, generator=gen),
            torch.randint(0, 4, (cfg.gan.batch_size,), generator=gen),
        )
        for _ in range(cfg.gan.n_critic)
    ]
    step_cls = VaeStep if cfg.gan.arch == "vae" else GanStep
    return step_cls(cfg.gan, models, CPU, 4, cfg.seed, cfg.train.channels_last), models, reals


@pytest.mark.parametrize(
    "overrides",
    [
        {"gan.loss": "ns", "gan.conditioning": "concat", "gan.mode_seeking": 0.0},
        {"gan.loss": "hinge", "gan.spectral_norm": True, "gan.conditioning": "projection"},
        {"gan.loss": "ls", "gan.diffaug": ["color", "translation", "cutout"]},
        {"gan.loss": "wgan-gp", "gan.n_critic": 2},
        {"gan.loss": "ns", "gan.r1_gamma": 1.0, "train.channels_last": False},
        {"gan.loss": "hinge", "gan.mode_seeking": 1.0},
        {"gan.loss": "ns", "gan.conditioning": "ac", "gan.spectral_norm": True, "gan.n_critic": 2},
        {"gan.loss": "ns", "gan.conditioning": "ac", "gan.fourier": 4},
        {"gan.loss": "hinge", "gan.conditioning": "adc", "gan.spectral_norm": True},
        {"gan.loss": "ns", "gan.conditioning": "adc", "gan.fourier": 4, "gan.fourier_warp": False},
    ],
    ids=[
        "ns-concat",
        "hinge-sn-projection",
        "ls-diffaug",
        "wgan-gp",
        "ns-r1",
        "hinge-mode-seeking",
        "ns-ac-sn",
        "ns-ac-fourier",
        "hinge-adc-sn",
        "ns-adc-straight-fourier",
    ],
)
def test_every_loss_trains(overrides: dict[str, Any], tmp_path: Path) -> None:
    step, models, reals = _tiny_step(overrides, tmp_path)
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in models.state().items() if k in WEIGHTS}
    for i in range(2):
        out = step(i, reals)
        assert set(out) == {"loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"}
        assert all(torch.isfinite(v) for v in out.values()), out
    after = models.state()
    for key in WEIGHTS:
        changed = [n for n, t in after[key].items() if t.is_floating_point() and not torch.equal(t, before[key][n])]
        assert changed, f"{key} did not change"


@pytest.mark.parametrize(
    "overrides",
    [
        {"gan.attention": 8, "gan.conditioning": "projection"},
        {"gan.arch": "resnet", "gan.loss": "hinge", "gan.spectral_norm": True, "gan.conditioning": "projection"},
        {"gan.arch": "resnet", "gan.attention": 4, "gan.conditioning": "adc", "gan.n_critic": 2},
        {"gan.arch": "resnet", "gan.loss": "wgan-gp", "gan.conditioning": "concat"},
        {"gan.arch": "vae"},
        {"gan.arch": "vae", "gan.attention": 8, "gan.vae.adversarial": 0.1, "gan.n_critic": 2, "gan.r1_gamma": 1.0},
    ],
    ids=["dcgan-attention", "resnet-hinge-sn", "resnet-attention-adc", "resnet-wgan-gp", "vae", "vae-gan"],
)
def test_every_family_trains(overrides: dict[str, Any], tmp_path: Path) -> None:
    """Every trained module changes and so do the EMA generator's samples; a VAE's loss (its ELBO) goes down."""
    step, models, reals = _tiny_step(overrides | {"train.channels_last": False}, tmp_path)
    z, labels = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 4
    samples = models.ema.module.eval()(z, labels)
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in models.state().items() if k in (*WEIGHTS, "encoder")}
    losses = []
    for i in range(6):
        out = step(i, reals)
        assert set(out) >= set(step.metrics) and all(torch.isfinite(out[k]) for k in step.metrics), out
        losses.append(out["loss_g"].item())
    after = models.state()
    trained = {"g", "g_ema"} | ({"encoder"} if "gan.arch" in overrides and overrides["gan.arch"] == "vae" else set())
    trained |= {"d"} if models.d is not None else set()
    assert set(before) == trained
    for key in trained:
        changed = [n for n, t in after[key].items() if t.is_floating_point() and not torch.equal(t, before[key][n])]
        assert changed, f"{key} did not change"
    assert not torch.allclose(models.ema.module.eval()(z, labels), samples, atol=1e-4)
    if overrides.get("gan.arch") == "vae":
        assert losses[-1] < losses[0], losses
        assert {"recon", "kl"} <= set(out) and (models.d is None) == ("gan.vae.adversarial" not in overrides)


def test_class_head_losses() -> None:
    """D: ``ac`` fits the real labels; ``adc`` tells 2K classes apart (real k, generated k).
    G: where D's head cannot tell its images from real ones of their class, ``adc`` costs nothing, while
    ``ac`` still pays the cross-entropy (its pull towards confidently classified images)."""
    k, gen = 3, torch.Generator().manual_seed(0)
    real = torch.randn(4, 2 * k, generator=gen).requires_grad_(True)
    fake = torch.randn(4, 2 * k, generator=gen)
    labels, y = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 0])
    rows = range(4)
    ac = -torch.log_softmax(real[:, :k], 1)[rows, labels].mean()
    assert d_class_loss("ac", real[:, :k], labels, fake[:, :k], y).item() == pytest.approx(ac.item())
    adc = -torch.log_softmax(real, 1)[rows, labels].mean() - torch.log_softmax(fake, 1)[rows, y + k].mean()
    loss = d_class_loss("adc", real, labels, fake, y)
    assert loss.item() == pytest.approx(adc.item())
    loss.backward()
    assert (real.grad[:, k:] > 0).all()  # real images are pushed away from every generated class
    alike = torch.randn(4, k, generator=gen).repeat(1, 2)  # as likely real as generated, class by class
    assert g_class_loss("adc", alike, y).item() == pytest.approx(0.0, abs=1e-6)
    assert g_class_loss("ac", alike[:, :k], y).item() > 0.0
    fooled = alike.clone()
    fooled[rows, y + k] -= 5.0  # D takes them for real images of class y
    assert g_class_loss("adc", fooled, y) < 0.0
    with pytest.raises(ValueError, match="has no class head"):
        g_class_loss("projection", alike, y)
    with pytest.raises(ValueError, match="has no class head"):
        d_class_loss("concat", real, labels, fake, y)


def test_mode_seeking_loss_punishes_collapse() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=gen)
    varied = torch.rand(8, 3, 8, 8, generator=gen)
    collapsed = varied.clone()
    collapsed[1::2] = collapsed[0::2]  # each pair draws the same image from two latents
    assert mode_seeking_loss(collapsed, z) == pytest.approx(1e5)
    assert mode_seeking_loss(varied, z) < 10.0
    closer = varied.clone()
    closer[1::2] = 0.5 * (varied[0::2] + varied[1::2])  # half the distance within each pair
    assert mode_seeking_loss(closer, z) == pytest.approx(2 * mode_seeking_loss(varied, z).item(), rel=1e-3)
    # Pairs are rows (2j, 2j + 1): the loss of a batch is the mean of its halves' losses (ranks hold whole pairs).
    halves = (mode_seeking_loss(varied[:4], z[:4]) + mode_seeking_loss(varied[4:], z[4:])) / 2
    assert mode_seeking_loss(varied, z) == pytest.approx(halves.item())


def test_mode_seeking_pairs_share_their_class(tmp_path: Path) -> None:
    step, models, reals = _tiny_step({"gan.mode_seeking": 1.0}, tmp_path)
    seen = []
    models.g.register_forward_hook(lambda _m, args, _out: seen.append(args[1].clone()))
    step(0, reals)
    labels = seen[-1]
    assert torch.equal(labels[0::2], labels[1::2]) and labels.unique().numel() > 1


def test_generator_and_discriminator_updates_do_not_leak(tmp_path: Path) -> None:
    step, models, reals = _tiny_step({"gan.n_critic": 2, "gan.r1_gamma": 1.0}, tmp_path)
    calls = {"g": 0, "d": 0}

    def count(name: str) -> Any:
        def hook(_: torch.Tensor) -> None:
            calls[name] += 1

        return hook

    first_g = next(models.g.parameters())
    first_d = next(models.d.parameters())
    first_g.register_post_accumulate_grad_hook(count("g"))
    first_d.register_post_accumulate_grad_hook(count("d"))
    step(0, reals)
    assert calls == {"g": 1, "d": 2}  # one backward into G (the G update), one per D update


def test_same_step_same_result_and_steps_differ(tmp_path: Path) -> None:
    a, _, reals = _tiny_step({"gan.diffaug": ["translation"]}, tmp_path)
    b, _, _ = _tiny_step({"gan.diffaug": ["translation"]}, tmp_path)
    out_a, out_b = a(3, reals), b(3, reals)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert not torch.equal(a(4, reals)["loss_g"], b(5, reals)["loss_g"])


@pytest.mark.slow
def test_non_finite_loss_is_one_line_and_keeps_the_checkpoint(
    tiny_shards: Path, extractor: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # An absurd D learning rate overflows D's weights: the loss becomes inf/NaN within a few steps.
    write_params(tmp_path, {"gan.lr_d": 1.0e30, "gan.steps": 20, "gan.eval_every": 100, "gan.checkpoint_every": 1})
    spec = importlib.util.spec_from_file_location("train_gan_stage", STAGE)
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with pytest.raises(SystemExit) as exit_info:
        stage.main(_stage_args(tmp_path, tiny_shards, extractor))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("train_gan: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert " is nan" in lines[0] or " is inf" in lines[0]
    assert f"last good checkpoint kept at {tmp_path / 'ckpt' / 'last.pt'}" in lines[0]
    failed_at = int(lines[0].split("step ")[1].split(":")[0])
    ckpt = checkpoint.load(tmp_path / "ckpt" / "last.pt")
    assert ckpt["step"] == failed_at - 1
    assert all(torch.isfinite(t).all() for t in ckpt["d"].values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    [
        {"gan.arch": "dcgan"},
        {"gan.arch": "resnet", "gan.attention": 8},
        {"gan.arch": "vae", "gan.vae.adversarial": 0.5},  # the encoder, the decoder and the D of its GAN term
    ],
    ids=["dcgan", "resnet-attention", "vae-gan"],
)
def test_world_size_1_and_2_train_the_same_weights(
    family: dict[str, Any], tiny_shards: Path, extractor: Path, tmp_path: Path
) -> None:
    shards = _constant_shards(tiny_shards, tmp_path / "shards")
    overrides = family | {
        "train.deterministic": True,
        "train.precision": "fp32",  # exact maths for the comparison, whatever the CPU's bf16 support
        "gan.steps": 4,
        "gan.n_critic": 2,
        "gan.r1_gamma": 0.5,
        "gan.diffaug": ["color", "translation", "cutout"],
        "gan.mode_seeking": 1.0,  # pairs of rows must stay within a rank
        "gan.conditioning": "ac",  # the class head's loss is part of D's and G's updates
        "gan.sync_bn": True,  # batch statistics over the global batch: the same math at any world size
    }
    results = {}
    for nproc in (1, 2):
        work = tmp_path / f"ws{nproc}"
        work.mkdir()
        write_params(work, overrides)
        status, err = processes.run(_command(work, shards, extractor, nproc), work / "stderr.log")
        assert status == 0, err[-3000:]
        results[nproc] = checkpoint.load(work / "ckpt" / "last.pt")
    trained = [k for k in (*WEIGHTS, "encoder") if k in results[1]]
    assert trained == [*WEIGHTS, "encoder"] if family["gan.arch"] == "vae" else list(WEIGHTS)
    for key in trained:
        for name, t1 in results[1][key].items():
            t2 = results[2][key][name]
            assert torch.allclose(t1.float(), t2.float(), rtol=1e-4, atol=1e-5), f"{key}.{name}"
    for metric in ("val_fid", "val_class_fidelity"):
        values = [[row[metric] for row in results[n]["history"] if metric in row] for n in (1, 2)]
        assert values[0] and values[0] == pytest.approx(values[1], rel=1e-4), metric
    client = MlflowClient()
    experiment = client.get_experiment_by_name("texture-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["world_size"] for r in runs) == ["1", "2"]
    assert {r.data.tags["model.arch"] for r in runs} == {family["gan.arch"]}


@pytest.mark.slow
def test_per_rank_batchnorm_ranks_evaluate_and_save_one_model(
    tiny_shards: Path, extractor: Path, tmp_path: Path
) -> None:
    """Without SyncBN each rank's running statistics follow its own rows; they are averaged before each
    evaluation and checkpoint. So the val FID of 2 ranks (each generating half of the samples) is the FID
    one process gets from the saved EMA generator."""
    params = write_params(tmp_path, {"train.precision": "fp32", "gan.steps": 6, "gan.eval_every": 3})
    assert not config.load(params).gan.sync_bn  # the default
    status, err = processes.run(_command(tmp_path, tiny_shards, extractor, 2), tmp_path / "stderr.log")
    assert status == 0, err[-3000:]
    ckpt = checkpoint.load(tmp_path / "ckpt" / "last.pt")
    generator, _ = load_generator(tmp_path / "out" / "generator.pt")
    generator.load_state_dict(ckpt["g_ema"])  # the last step's EMA generator, evaluated at step 6
    classes = json.loads((tiny_shards / "manifest.json").read_text())["classes"]
    cfg = config.load(params)
    task = GanTask(cfg, tiny_shards, extractor, tmp_path / "unused", CPU)
    task.models.ema.module.load_state_dict(generator.state_dict())
    logged = [row["val_fid"] for row in ckpt["history"] if row["step"] == 6 and "val_fid" in row]
    # measured: equal to 5e-10 (relative; float32 across batchings: 1e-5); with each rank keeping its own statistics
    # they differ by 5e-5
    assert logged == [pytest.approx(task.validate(6)["val_fid"], rel=1e-5)]
    assert classes == task.classes


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dcgan", "vae"])  # the GAN families share GanStep; the VAE has its own step
def test_sigterm_saves_and_resume_matches_a_straightrun(
    arch: str, tiny_shards: Path, extractor: Path, tmp_path: Path
) -> None:
    overrides = {"train.deterministic": True, "gan.steps": 40, "gan.checkpoint_every": 1000, "gan.eval_every": 20}
    overrides["gan.arch"] = arch
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    for work in (stopped, straight):
        work.mkdir()
        write_params(work, overrides)
    last, log = stopped / "ckpt" / "last.pt", stopped / "stderr.log"
    with processes.started(_command(stopped, tiny_shards, extractor, None), log) as proc:
        _wait_for(last.is_file, proc)  # the step-0 checkpoint: training is under way
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    step = int(checkpoint.load(last)["step"])
    assert 0 < step < 40 and f"stopped at step {step}" in err

    status, err = processes.run(_command(stopped, tiny_shards, extractor, None), log)
    assert status == 0 and f"resuming from {last} at step {step}" in err, err[-3000:]
    status, err = processes.run(_command(straight, tiny_shards, extractor, None), straight / "stderr.log")
    assert status == 0, err[-3000:]
    a, b = checkpoint.load(last), checkpoint.load(straight / "ckpt" / "last.pt")
    trained = ["g", "g_ema", "encoder"] if arch == "vae" else list(WEIGHTS)  # a plain VAE has no D
    assert [k for k in (*WEIGHTS, "encoder") if k in a] == trained
    for key in trained:
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key

    # A finished run asked again (DVC reruns a stage only when its code, params or data changed) trains
    # afresh: the checkpoint says nothing about what changed. Deterministic: the same generator again.
    before, _ = load_generator(straight / "out" / "generator.pt")
    shutil.rmtree(straight / "out")
    try:
        train_gan(config.load(straight / "params.yaml"), tiny_shards, extractor, straight / "out", straight / "ckpt")
    finally:
        torch.use_deterministic_algorithms(False)  # train.deterministic set it for this process
    again, _ = load_generator(straight / "out" / "generator.pt")
    pairs = zip(before.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert {p.name for p in (straight / "out").iterdir()} == {"generator.pt", "run.json", "history.csv", "samples.png"}


def _worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers started by ``launcher``, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if ppid == launcher and rank:
            found[int(rank[0])] = int(entry.name)
    return found


@pytest.mark.slow
def test_killed_worker_resumes_in_the_same_mlflowrun(tiny_shards: Path, extractor: Path, tmp_path: Path) -> None:
    params = write_params(
        tmp_path,
        {"gan.steps": 60, "gan.checkpoint_every": 5, "gan.log_every": 5, "gan.eval_every": 20, "gan.sample_every": 20},
    )
    last = tmp_path / "ckpt" / "last.pt"
    log = tmp_path / "stderr.log"
    with processes.started(_command(tmp_path, tiny_shards, extractor, nproc=2, restarts=1), log) as proc:
        _wait_for(lambda: last.is_file() and _checkpoint_step(last) >= 5, proc)
        os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
        proc.wait(timeout=240)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert f"resuming from {last}" in err

    ckpt = checkpoint.load(last)
    assert ckpt["step"] == 60
    generator, meta = load_generator(tmp_path / "out" / "generator.pt")
    assert meta["classes"] == ["stripes", "checker", "dots", "brick"] and meta["run_id"] == ckpt["run_id"]
    assert generator.image_size == 16
    for name in ("run.json", "history.csv", "samples.png"):
        assert (tmp_path / "out" / name).is_file(), name

    client = MlflowClient()
    experiment = client.get_experiment_by_name("texture-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == ckpt["run_id"] == json.loads((tmp_path / "out" / "run.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    expected = stage_params(config.load(params), *SECTIONS)
    assert set(run.data.params) == set(expected)
    assert run.data.params["gan.steps"] == "60"
    for key in ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_d", "grad_norm_g", "samples_per_s", "val_fid"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps and len(steps) == len(set(steps)), key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_fid")) == [0, 20, 40, 60]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "history.csv"} <= artifacts
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/step_000020.png" in grids

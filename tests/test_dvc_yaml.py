"""dvc.yaml stays honest: every stage depends on all the code it runs and on every param section it reads.

A dependency missed here means `dvc repro` skips a stage whose result would change (stale models and
metrics); the checks follow imports (also those inside functions) from each stage's script.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# `mlflow` says where runs are logged, not what is computed: changing the tracking URI must not retrain.
SECTIONS = ("data", "train", "gan", "segmenter", "evaluate", "register")
NOT_COMPUTATION = {ROOT / "pipeline" / "config.py"}  # validation reads every section; it computes nothing


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """``pipeline.*`` modules imported anywhere in a file (``from pipeline import x`` counts x if a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in found if n.split(".")[0] == "pipeline" and _module_file(n)}


def _closure(script: Path) -> set[Path]:
    """The script and every project module it reaches through imports."""
    seen, todo = {script}, [script]
    while todo:
        for name in _imports(todo.pop()):
            parts = name.split(".")
            for i in range(2, len(parts) + 1):  # pipeline.a.b runs pipeline/a/__init__.py too (if not empty)
                path = _module_file(".".join(parts[:i]))
                if path is not None and path not in seen and path.stat().st_size:
                    seen.add(path)
                    todo.append(path)
    return seen


def _scripts(stage: dict) -> list[Path]:
    cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
    scripts = [ROOT / s for s in re.findall(r"stages/\w+\.py", cmd)]
    if "-m pipeline.launch" in cmd:
        scripts.append(ROOT / "pipeline" / "launch.py")
    return scripts


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_depends_on_all_the_code_it_runs(name: str) -> None:
    stage = STAGES[name]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    code = set().union(*(_closure(s) for s in _scripts(stage)))
    assert code, f"{name}: no stage script found in its cmd"
    missing = sorted(p.relative_to(ROOT).as_posix() for p in code if not _covered(p, deps))
    assert not missing, f"dvc.yaml stage {name} runs these files but does not depend on them: {missing}"


def _cmd_params(stage: dict) -> set[str]:
    cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
    return set(re.findall(r"\$\{([\w.]+)\}", cmd))  # DVC tracks interpolated params by itself


def _is_cfg(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "cfg") or (isinstance(node, ast.Attribute) and node.attr == "cfg")


def _param_reads(path: Path) -> set[str]:
    """``section.key`` for each ``cfg.section.key`` in the code, ``section`` for a whole section passed on."""
    tree = ast.parse(path.read_text())
    sections = {id(n): n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _is_cfg(n.value)}
    keyed = {id(n.value): n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n.value) in sections}
    reads = set()
    for key, node in sections.items():
        if node.attr == "seed" or node.attr in SECTIONS:
            reads.add(f"{node.attr}.{keyed[key]}" if key in keyed and node.attr != "seed" else node.attr)
    return reads


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_lists_every_param_its_code_reads(name: str) -> None:
    stage = STAGES[name]
    declared = {p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])} | _cmd_params(stage)
    if "data/shards" in stage.get("deps", []):
        declared.add("data.*")  # the data section as a whole reaches the stage through prepare's output
    code = set().union(*(_closure(s) for s in _scripts(stage))) - NOT_COMPUTATION
    read = set().union(*(_param_reads(p) for p in code))

    def listed(param: str) -> bool:
        section = param.split(".")[0]
        if param in declared or section in declared:
            return True
        # a whole section handed on (``ev = cfg.evaluate``) is read key by key: some key of it must be listed
        return "." not in param and any(d.startswith(section + ".") for d in declared)

    missing = sorted(p for p in read if not listed(p))
    assert not missing, f"dvc.yaml stage {name} reads these params but does not list them: {missing}"

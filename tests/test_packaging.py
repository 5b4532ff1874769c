"""What the package declares matches what it is: imported dependencies, package data, and the
names docs/architecture.md points readers to."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import re
import sys
import typing
from pathlib import Path

import tomllib

from alphadrive_ray.config import Config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "alphadrive_ray"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dist(requirement: str) -> str:
    """'ray[default]>=2.40' -> 'ray' (normalised as PyPI does)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, str]:
    """Top-level module -> a file that imports it, over the package (absolute imports)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m != "alphadrive_ray"}


def test_every_imported_distribution_is_declared():
    # required, or in a feature extra that the importing code asks for lazily ([gpu]: vLLM,
    # [wandb]: the W&B tracker); the dev and bench extras do not count: the package runs without them
    project = PYPROJECT["project"]
    required = {_dist(r) for r in project["dependencies"]}
    features = {name: reqs for name, reqs in project["optional-dependencies"].items() if name not in ("dev", "bench")}
    assert set(features) == {"gpu", "wandb"}, features
    optional = {_dist(r) for reqs in features.values() for r in reqs}
    by_module = importlib.metadata.packages_distributions()
    missing = []
    for module, where in imported_modules().items():
        dists = [_dist(d) for d in by_module.get(module, [module])]  # not installed (vllm): named like the module
        if not any(d in required or d in optional for d in dists):
            missing.append(f"{module} ({'/'.join(dists)}, imported by {where})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_package_data_names_files_that_exist():
    package_data = PYPROJECT["tool"]["setuptools"].get("package-data", {})
    for package, patterns in package_data.items():
        root = REPO / package.replace(".", "/")
        for pattern in patterns:
            assert list(root.glob(pattern)), f"package-data of {package} names {pattern!r}, which matches no file"


# --- docs/architecture.md ---------------------------------------------------------------------


def _definitions() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> its top-level names, class -> its members) over the package, by parsing."""
    modules: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        names = modules.setdefault(module, set())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
    return modules, classes


def _config_keys() -> set[str]:
    hints = typing.get_type_hints(Config)
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(hints[s.name])}


METRIC_NAMESPACES = ("rollout", "reward", "loss", "perf", "eval")  # `rollout/logp_diff` is a metric


def unknown_names(text: str) -> list[str]:
    """The dotted names in `backticks` that name nothing: no config key, package module,
    function, class or method (`Class.method`, `module.name`, `alphadrive_ray.module.name`,
    `folder/module.name`), nor an attribute of an installed library (`ray.put`)."""
    modules, classes = _definitions()
    keys = _config_keys()
    bad = []
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)  # fenced blocks: diagrams and commands
    for span in re.findall(r"`([^`]+)`", text):
        name = re.split(r"[(\s]", span.strip(), maxsplit=1)[0]
        if not re.fullmatch(r"[A-Za-z_][\w./]*\w", name) or not ("." in name or "/" in name):
            continue
        if name in keys or (REPO / name).exists() or (PACKAGE / name).exists():
            continue
        if name.split("/")[0] in METRIC_NAMESPACES or (name.endswith(".py") and list(PACKAGE.rglob(name))):
            continue
        name = name.removeprefix("alphadrive_ray.").replace("/", ".")
        head, _, attr = name.rpartition(".")
        if head in modules and attr in modules[head]:
            continue
        if head in classes and attr in classes[head]:
            continue
        top = head.split(".")[0]
        if top not in modules and top not in classes and _external_exists(name):
            continue
        bad.append(span.split("(")[0])
    return bad


def _external_exists(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return False
    for part in parts[1:]:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except (ImportError, AttributeError):
                return False
    return True


def test_the_name_checker_finds_stale_names():
    text = "`RolloutGroup.submit`, `RolloutGroup.generate_refs`, `algo.compute_kl`, `grpo.beta`, `grpo.betta`, `ray.put`"
    assert unknown_names(text) == ["RolloutGroup.generate_refs", "grpo.betta"]


def test_architecture_names_only_what_exists():
    stale = unknown_names((REPO / "docs" / "architecture.md").read_text())
    assert not stale, f"docs/architecture.md names what does not exist: {stale}"

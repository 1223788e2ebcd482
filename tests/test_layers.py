"""The layers import downwards only (README "Architecture").

Every module under ``src/taemi`` is parsed with :mod:`ast` (never imported). Each
``import``/``from ... import`` of ``taemi`` (module level or inside a function, relative
imports resolved) must point at the importer's own package or at a lower rank of
:data:`RANKS`; and every package and root module must be placed in the table, so a new
one is given a rank before it is used.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: The layers, low to high. A module may import its own package or a lower rank.
#: Keys are sub-packages and root modules of ``taemi`` (``""``: the package itself).
RANKS: dict[str, int] = {
    "": 0,  # taemi/__init__.py: version, emotion and modality names
    "config": 0,  # run configuration dataclasses and presets
    "signals": 0,  # graceful stop on SIGINT/SIGTERM
    "locking": 0,  # folder lock files
    "runtime": 0,  # device, precision, autocast, threads
    "numeric": 0,  # checks on arrays shared by several layers (finite values)
    "store": 1,  # the feature store
    "data": 2,  # labels, batches, datasets, samplers, augmentation
    "backbones": 3,  # pretrained models by family, profiles
    "model": 4,  # the fusion model
    "extract": 5,  # media -> features
    "finetune": 6,  # end-to-end fine-tuning model and data
    "eval": 7,  # metrics, statistics, submissions, batched prediction
    "synth": 8,  # synthetic feature stores and media
    "run": 9,  # the run folder
    "train": 10,  # the training recipe
    "inference": 11,  # one inference path for every caller
    "predict_media": 11,  # media files -> predictions
    "release": 11,  # the authors' checkpoint -> a run folder
    "experiments": 12,  # ablations, robustness, reports, comparisons
    "demo": 13,  # the end-to-end demo
    "serve": 13,  # taemi serve: the HTTP API over a run (media -> predictions per request)
    "cli": 14,  # one module per command
    "__main__": 14,  # ``python -m taemi``: the command line
}


def unit_of(module: str) -> str:
    """``taemi.data.dataset`` -> ``data``; ``taemi`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, src: Path) -> str:
    """``src/taemi/data/dataset.py`` -> ``taemi.data.dataset``; a package's ``__init__``
    is the package."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(
    tree: ast.Module, module: str, is_package: bool, src: Path
) -> list[tuple[int, str]]:
    """(line, ``taemi...`` module) for every import of taemi in ``tree``, at any depth.

    ``from X import name`` counts as ``X.name`` when that is a module or package on disk
    (``from taemi import runtime``), else as ``X`` (``from taemi import MODALITIES``).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "taemi"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importer's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "taemi":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                on_disk = src.joinpath(*sub.split("."))
                is_module = on_disk.is_dir() or on_disk.with_suffix(".py").is_file()
                found.append((node.lineno, sub if is_module else target))
    return sorted(set(found))


def check_layers(src: Path, ranks: dict[str, int]) -> tuple[list[str], list[str]]:
    """(upward imports, unplaced packages/modules) under ``src/taemi``, as messages."""
    upward: list[str] = []
    unplaced: set[str] = set()
    root = src / "taemi"
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, src)
        where = path.relative_to(src.parent)  # src/taemi/...
        unit = unit_of(module)
        if unit not in ranks:
            unplaced.add(f"taemi.{unit} ({where}) is not in the layer table")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py", src):
            other = unit_of(target)
            if other not in ranks:
                unplaced.add(
                    f"{where}:{line} imports {target}, whose taemi.{other} is not in the layer table"
                )
            elif ranks[other] > ranks[unit]:
                upward.append(
                    f"{where}:{line} imports {target} (rank {ranks[unit]} -> {ranks[other]})"
                )
    return upward, sorted(unplaced)


def test_every_package_and_root_module_is_placed() -> None:
    _, unplaced = check_layers(SRC, RANKS)
    assert not unplaced, "give these a rank in RANKS (and the README):\n" + "\n".join(unplaced)


def test_imports_point_downwards() -> None:
    upward, _ = check_layers(SRC, RANKS)
    assert not upward, f"{len(upward)} import(s) of a higher layer:\n" + "\n".join(upward)


def test_the_check_sees_every_kind_of_import(tmp_path) -> None:
    """The checker itself, on a tiny tree: absolute, relative, function-level and
    ``from taemi import <module>`` imports are all seen; names from ``taemi`` are rank 0."""
    pkg = tmp_path / "taemi"
    for folder in ("low", "high", "stray"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("NAMES = ()\n")
    (pkg / "top.py").write_text("")
    (pkg / "high" / "b.py").write_text("")
    (pkg / "low" / "a.py").write_text(
        "from taemi import NAMES\n"  # a name from the package: fine
        "from . import a\n"  # its own package: fine
        "import taemi.high.b\n"  # 3: upward
        "from ..high import b\n"  # 4: upward, relative
        "def f():\n"
        "    from taemi import top\n"  # 6: upward, inside a function
        "    from taemi.stray import x\n"  # 7: a package not in the table
    )
    upward, unplaced = check_layers(tmp_path, {"": 0, "low": 1, "high": 2, "top": 3})
    a = Path(tmp_path.name, "taemi/low/a.py")
    assert upward == [
        f"{a}:3 imports taemi.high.b (rank 1 -> 2)",
        f"{a}:4 imports taemi.high.b (rank 1 -> 2)",
        f"{a}:6 imports taemi.top (rank 1 -> 3)",
    ]
    assert set(unplaced) == {
        f"{a}:7 imports taemi.stray, whose taemi.stray is not in the layer table",
        f"taemi.stray ({Path(tmp_path.name, 'taemi/stray/__init__.py')}) is not in the layer table",
    }

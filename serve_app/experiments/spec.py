"""The experiment spec (JSON or YAML) and its expansion into runs.

.. code-block:: yaml

    name: fusion-resolution
    datasets: [spot, box]          # folders under the configured dataset root (or upload a `bundle`)
    models: [fusion]
    presets: [fast]
    grid:                          # cartesian product of every list
      fusion.resolution: [96, 128]
      texture_size: [512, 1024]
    runs:                          # and/or an explicit list (each may name its own dataset)
      - {model: fusion, preset: balanced, overrides: {faces: 20000}}
    repeats: 1

Runs = datasets x models x presets x grid, then the explicit runs (each crossed with the
datasets unless it names one), each repeated ``repeats`` times. Every problem raises
:class:`InvalidExperimentError` (HTTP 422) with ``details.key`` naming the offending key.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PRESETS
from pipeline.errors import InvalidInputError
from pipeline.overrides import InvalidOverridesError, run_slug, validate_overrides

INVALID_EXPERIMENT = "INVALID_EXPERIMENT"
#: Name of the dataset of an uploaded bundle.
UPLOAD_DATASET = "upload"
#: Ground-truth mesh inside a dataset bundle (F-score / Chamfer when present).
GT_MESH = "gt/mesh.glb"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")
_SPEC_KEYS = {
    "name",
    "description",
    "dataset",
    "datasets",
    "models",
    "model",
    "presets",
    "preset",
    "grid",
    "runs",
    "repeats",
}
_RUN_KEYS = {"model", "preset", "overrides", "dataset", "name"}


class InvalidExperimentError(InvalidInputError):
    """The experiment spec is invalid (HTTP 422); ``details.key`` names the offending key."""

    code = INVALID_EXPERIMENT


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: a dataset, a model, a preset and overrides (canonical keys)."""

    index: int
    dataset: str
    model: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    slug: str = ""
    """Unique within the experiment: ``<dataset>/<model>-<preset>-res192-...`` (``-r2`` ... for repeats)."""


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    description: str
    runs: list[RunSpec]
    raw: dict


def _bad(message: str, key: str, **details) -> InvalidExperimentError:
    return InvalidExperimentError(message, details={"key": key, **details})


def parse_spec_text(text: str | bytes) -> dict:
    """JSON or YAML text -> dict (YAML is a superset of JSON; a JSON body parses either way)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise _bad("the experiment spec is not UTF-8 text", "spec") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise _bad("the experiment spec is nested too deeply", "spec") from None
    except ValueError:
        try:
            doc = yaml.safe_load(text)
        except RecursionError:
            raise _bad("the experiment spec is nested too deeply", "spec") from None
        except yaml.YAMLError as e:
            raise _bad(f"the experiment spec is neither JSON nor YAML: {str(e).splitlines()[0]}", "spec") from None
    if not isinstance(doc, dict):
        raise _bad("the experiment spec must be an object (mapping)", "spec")
    return doc


def _as_list(doc: dict, plural: str, singular: str, default: list | None) -> list:
    if plural in doc and singular in doc:
        raise _bad(f"give {plural!r} or {singular!r}, not both", plural)
    v = doc.get(plural, doc.get(singular, default))
    key = plural if plural in doc else singular
    if v is None:
        raise _bad(f"{plural!r} is required", plural)
    if not isinstance(v, list):
        v = [v]
    if not v:
        raise _bad(f"{key!r} must not be empty", key)
    if not all(isinstance(x, str) for x in v):
        raise _bad(f"{key!r} must be a list of strings", key)
    return list(dict.fromkeys(v))


def check_dataset_name(name: str, key: str = "dataset") -> str:
    """A dataset name is a relative path under the dataset root: no ``..``, no absolute path."""
    if not isinstance(name, str) or not _DATASET_RE.match(name) or ".." in name.split("/") or "//" in name:
        raise _bad(f"dataset {name!r} is not a plain relative folder name", key, dataset=str(name)[:200])
    return name.rstrip("/")


def resolve_dataset(root: str | Path | None, name: str, key: str = "dataset") -> Path:
    """The bundle folder (or .zip) of ``name`` under ``root``; refuses names that escape the root."""
    check_dataset_name(name, key)
    if root is None:
        raise _bad("this service has no dataset root (experiments.dataset_root); upload a `bundle`", key)
    base = Path(root).resolve()
    for cand in (base / name, base / f"{name}.zip"):
        p = cand.resolve()  # follows symlinks: a link out of the root is refused too
        if p != base and base not in p.parents:
            raise _bad(f"dataset {name!r} escapes the dataset root", key, dataset=name)
        if p.is_dir() or p.is_file():
            return p
    raise _bad(f"no dataset {name!r} under the dataset root", key, dataset=name)


def expand_spec(
    doc: dict,
    *,
    known_models: tuple[str, ...],
    served_models: list[str],
    max_runs: int,
    has_upload: bool,
) -> ExperimentSpec:
    """Validate ``doc`` and expand it into runs (see the module docstring)."""
    name, description, repeats = _check_header(doc)
    datasets = _datasets(doc, has_upload)
    explicit = doc.get("runs", [])
    has_grid_axes = any(k in doc for k in ("grid", "models", "model", "presets", "preset"))
    if not isinstance(explicit, list):
        raise _bad("runs must be a list of {model, preset, overrides, dataset}", "runs")
    if len(explicit) > max_runs:
        raise _bad(f"the spec lists {len(explicit)} runs; the limit is {max_runs}", "runs", limit=max_runs)
    if not explicit and not has_grid_axes:
        raise _bad("the spec has no runs: give 'models'/'presets'/'grid' and/or 'runs'", "runs")

    chk = _RunChecker(known_models, served_models)
    combos = _grid_combos(doc, chk, max_runs) if has_grid_axes else []
    combos += _explicit_combos(explicit, chk, has_upload)
    expanded = [
        (d if ds is None else ds, m, p, o) for ds, m, p, o in combos for d in (datasets if ds is None else [ds])
    ]
    n = len(expanded) * repeats
    if n > max_runs:
        raise _bad(f"the experiment expands to {n} runs; the limit is {max_runs}", "grid", runs=n, limit=max_runs)
    return ExperimentSpec(name=name, description=description, runs=_numbered_runs(expanded, repeats), raw=doc)


def _check_header(doc: dict) -> tuple[str, str, int]:
    """(name, description, repeats), checked; unknown top-level keys refused."""
    unknown = set(doc) - _SPEC_KEYS
    if unknown:
        k = sorted(unknown)[0]
        raise _bad(f"unknown key {k!r}; valid keys: {sorted(_SPEC_KEYS)}", k)
    name = doc.get("name", "experiment")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _bad("name must be 1-64 letters, digits, '.', '_' or '-'", "name")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise _bad("description must be a string", "description")
    repeats = doc.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise _bad("repeats must be an integer >= 1", "repeats")
    return name, description, repeats


def _datasets(doc: dict, has_upload: bool) -> list[str]:
    if has_upload:
        if "dataset" in doc or "datasets" in doc:
            raise _bad("an uploaded bundle and 'datasets' exclude each other", "datasets")
        return [UPLOAD_DATASET]
    return [check_dataset_name(d, "datasets") for d in _as_list(doc, "datasets", "dataset", None)]


class _RunChecker:
    """Checks of one run's model, preset and overrides; errors name the spec key."""

    def __init__(self, known_models: tuple[str, ...], served_models: list[str]):
        self.known = known_models
        self.served = served_models

    def model(self, m: str, key: str) -> str:
        if m not in self.known:
            raise _bad(f"unknown model {m!r}; known: {list(self.known)}", key, model=m)
        if m not in self.served:
            raise _bad(f"model {m!r} is not served by this deployment; served: {self.served}", key, model=m)
        return m

    def preset(self, p: str, key: str) -> str:
        if p not in PRESETS:
            raise _bad(f"unknown preset {p!r}; choose one of {sorted(PRESETS)}", key, preset=p)
        return p

    def overrides(self, o: Any, key: str) -> dict:
        try:
            return validate_overrides(o)
        except InvalidOverridesError as e:
            raise _bad(
                e.message,
                f"{key}.{e.details.get('key', '')}".rstrip("."),
                **{k: v for k, v in e.details.items() if k != "key"},
            ) from None


Combo = tuple[str | None, str, str, dict]


def _grid_combos(doc: dict, chk: _RunChecker, max_runs: int) -> list[Combo]:
    """models x presets x every grid axis (dataset None: each of the spec's datasets)."""
    models = [chk.model(m, "models") for m in _as_list(doc, "models", "model", ["fusion"])]
    presets = [chk.preset(p, "presets") for p in _as_list(doc, "presets", "preset", ["balanced"])]
    grid = doc.get("grid", {}) or {}
    if not isinstance(grid, dict):
        raise _bad("grid must map parameter -> list of values", "grid")
    axes: list[tuple[str, list]] = []
    for k, values in grid.items():
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise _bad(f"grid.{k} must list at least one value", f"grid.{k}")
        for v in values:
            chk.overrides({k: v}, "grid")
        axes.append((str(k), values))
    chk.overrides({k: v[0] for k, v in axes}, "grid")  # aliases that collide across axes
    planned = len(models) * len(presets) * math.prod(len(v) for _, v in axes)
    if planned > max_runs:  # before the product is built: a wide grid would take minutes to expand
        raise _bad(f"the grid expands to {planned} runs; the limit is {max_runs}", "grid", runs=planned, limit=max_runs)
    keys = [k for k, _ in axes]
    return [
        (None, m, p, chk.overrides(dict(zip(keys, values, strict=True)), "grid"))
        for m, p in itertools.product(models, presets)
        for values in itertools.product(*(v for _, v in axes))
    ]


def _explicit_combos(explicit: list, chk: _RunChecker, has_upload: bool) -> list[Combo]:
    combos: list[Combo] = []
    for i, r in enumerate(explicit):
        key = f"runs[{i}]"
        if not isinstance(r, dict):
            raise _bad("each run must be an object {model, preset, overrides, dataset}", key)
        extra = set(r) - _RUN_KEYS
        if extra:
            raise _bad(
                f"unknown key {sorted(extra)[0]!r} in a run; valid: {sorted(_RUN_KEYS)}", f"{key}.{sorted(extra)[0]}"
            )
        if "name" in r and not (isinstance(r["name"], str) and _NAME_RE.match(r["name"])):
            raise _bad("a run's name must be 1-64 letters, digits, '.', '_' or '-'", f"{key}.name")
        for k in ("model", "preset"):
            if k in r and not isinstance(r[k], str):
                raise _bad(f"a run's {k} must be a string", f"{key}.{k}")
        ds = r.get("dataset")
        if ds is not None:
            if has_upload:
                raise _bad("a run cannot name a dataset when a bundle is uploaded", f"{key}.dataset")
            ds = check_dataset_name(ds, f"{key}.dataset")
        combos.append(
            (
                ds,
                chk.model(r.get("model", "fusion"), f"{key}.model"),
                chk.preset(r.get("preset", "balanced"), f"{key}.preset"),
                chk.overrides(r.get("overrides") or {}, f"{key}.overrides"),
            )
        )
    return combos


def _numbered_runs(expanded: list[tuple[str, str, str, dict]], repeats: int) -> list[RunSpec]:
    """One RunSpec per combination and repeat, with unique slugs (``-r2`` ... for repeats)."""
    runs: list[RunSpec] = []
    seen: dict[str, int] = {}
    for ds, m, p, o in expanded:
        for _ in range(repeats):
            base = f"{ds}/{run_slug(m, p, o)}" if ds != UPLOAD_DATASET else run_slug(m, p, o)
            seen[base] = seen.get(base, 0) + 1
            slug = base if seen[base] == 1 else f"{base}-r{seen[base]}"
            runs.append(RunSpec(index=len(runs), dataset=ds, model=m, preset=p, overrides=o, slug=slug))
    return runs

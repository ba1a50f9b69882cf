"""Parameter overrides on top of a preset: ``{"fusion.resolution": 160, "texture_size": 512}``.

Keys are dotted paths into :class:`pipeline.config.ReconstructConfig` (``fusion.target_faces``,
``texture.size``, ``max_working_resolution`` ...), or one of the short :data:`ALIASES`. They are
checked against the dataclass fields (names and value types) before any job is queued, and
applied with ``dataclasses.replace`` on the frozen configs. Pure Python: used by the ingress
(validation) and by the model deployment (application).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

from pipeline.config import ReconstructConfig
from pipeline.errors import InvalidInputError

#: Short names accepted for the most swept parameters -> dotted path.
ALIASES: dict[str, str] = {
    "fusion_resolution": "fusion.resolution",
    "resolution": "fusion.resolution",
    "face_target": "fusion.target_faces",
    "target_faces": "fusion.target_faces",
    "faces": "fusion.target_faces",
    "texture_size": "texture.size",
    "nvdiffrec_iterations": "refine.iterations",
    "iterations": "refine.iterations",
    "working_resolution": "max_working_resolution",
}

#: Top-level fields that are not parameters of a run: the preset is its own field of a run,
#: the device belongs to the model deployment.
NOT_OVERRIDABLE = frozenset({"preset", "device"})

#: Short labels of parameters in run names (``fusion-fast-res192-faces40k``).
SLUG_LABELS: dict[str, str] = {
    "fusion.resolution": "res",
    "fusion.target_faces": "faces",
    "texture.size": "tex",
    "refine.iterations": "it",
    "max_working_resolution": "wr",
}

INVALID_OVERRIDES = "INVALID_OVERRIDES"

#: Upper bounds of the parameters that size a run's memory or time (inclusive). A 100000^3 grid
#: or a 65536^2 texture would drive a replica out of memory (and be retried); the bounds sit
#: at twice the `quality` preset or more. Tuple fields bound each element.
OVERRIDE_MAX: dict[str, float] = {
    "camera.carve_resolution": 256,
    "fusion.resolution": 512,
    "fusion.smooth_iterations": 500,
    "fusion.target_faces": 500_000,
    "texture.size": 8192,
    "texture.padding_px": 64,
    "texture.xatlas_timeout_s": 3600,
    "camera_refine.level_image_sizes": 4096,
    "camera_refine.iterations": 2000,
    "photo_refine.pass_image_sizes": 4096,
    "photo_refine.search_steps": 64,
    "photo_refine.patch_radius": 16,
    "refine.iterations": 5000,
    "refine.resolution": 4096,
    "refine.time_budget_s": 7200,
    "refine.convergence_window": 1000,
    "refine.visibility_interval": 1000,
    "refine.smoothing_steps": 100,
    "refine.coarse_resolution": 4096,
    "refine.coarse_iterations": 5000,
    "refine.supersample": 4,
    "max_working_resolution": 4096,
}
#: Bound of every other numeric parameter (weights, rates, tolerances): finite and at most this.
OVERRIDE_DEFAULT_MAX = 1e6
#: Longest tuple parameter (pass sizes, levels).
OVERRIDE_MAX_ITEMS = 8


class InvalidOverridesError(InvalidInputError):
    """An override names no config field or has the wrong type (HTTP 422); ``details.key`` names it."""

    code = INVALID_OVERRIDES


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> type hint of every non-dataclass field under ``cls``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name, f.type)
        path = f"{prefix}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out.update(_leaf_fields(hint, path + "."))
        elif not prefix and f.name in NOT_OVERRIDABLE:
            continue
        else:
            out[path] = hint
    return out


def overridable_keys() -> dict[str, Any]:
    """Dotted path -> type hint of every parameter an override may set (follows ReconstructConfig as it grows)."""
    return _leaf_fields(ReconstructConfig)


def canonical_key(key: str) -> str:
    return ALIASES.get(key, key)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against ``hint`` (int, float, bool, str, Literal, tuple[...]); raises InvalidOverridesError."""
    origin = typing.get_origin(hint)
    bad = InvalidOverridesError(
        f"override {key!r} = {value!r} does not fit the field's type {getattr(hint, '__name__', hint)}",
        details={"key": key, "value": repr(value)[:100]},
    )
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise InvalidOverridesError(
                f"override {key!r} = {value!r} is not one of {list(typing.get_args(hint))}",
                details={"key": key, "choices": list(typing.get_args(hint))},
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        if len(value) > OVERRIDE_MAX_ITEMS:
            raise InvalidOverridesError(
                f"override {key!r} has {len(value)} items; at most {OVERRIDE_MAX_ITEMS}",
                details={"key": key, "limit": OVERRIDE_MAX_ITEMS},
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, inner, key) for v in value)
        if len(args) != len(value):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return _bounded(value, key)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if isinstance(value, int) and abs(value) > 1e300:  # float() would overflow
            return _bounded(math.inf, key)
        return float(_bounded(float(value), key))
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value  # a hint we do not know how to check (Any, unions): the dataclass takes it as is


def _bounded(value: int | float, key: str) -> int | float:
    """``value`` when finite and within [0, the key's bound]; InvalidOverridesError naming the bound otherwise."""
    high = OVERRIDE_MAX.get(canonical_key(key), OVERRIDE_DEFAULT_MAX)
    if not math.isfinite(value) or not 0 <= value <= high:
        raise InvalidOverridesError(
            f"override {key!r} = {value!r} is out of range: it must be finite, in [0, {high:g}]",
            details={"key": key, "value": repr(value)[:100], "low": 0, "high": high},
        )
    return value


def parse_overrides_json(text: str | None) -> dict | None:
    """The ``overrides`` form field (JSON text) as a dict; None when absent or blank."""
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # bad syntax, or nested past the recursion limit
        raise InvalidOverridesError("overrides must be a JSON object", details={"key": "overrides"}) from None


def validate_overrides(overrides: dict | None) -> dict[str, Any]:
    """Canonical dotted keys -> checked values. Unknown keys, wrong types and aliases that
    collide raise :class:`InvalidOverridesError` naming the key (and the valid keys)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise InvalidOverridesError("overrides must be an object of parameter -> value", details={"key": "overrides"})
    fields = overridable_keys()
    out: dict[str, Any] = {}
    for raw, value in overrides.items():
        key = canonical_key(str(raw))
        if key not in fields:
            raise InvalidOverridesError(
                f"unknown parameter {raw!r}; valid: {sorted(fields)} or aliases {sorted(ALIASES)}",
                details={"key": str(raw), "valid": sorted(fields), "aliases": sorted(ALIASES)},
            )
        if key in out:
            raise InvalidOverridesError(f"parameter {key!r} is set twice (alias {raw!r})", details={"key": str(raw)})
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise InvalidOverridesError(f"override {raw!r} must not be negative", details={"key": str(raw)})
        out[key] = _coerce(value, fields[key], str(raw))
    return out


def apply_overrides(cfg: ReconstructConfig, overrides: dict | None) -> ReconstructConfig:
    """``cfg`` with ``overrides`` applied (validated first) through ``dataclasses.replace``.

    Nested configs are rebuilt bottom-up, so the result stays a tree of frozen dataclasses.
    """
    checked = validate_overrides(overrides)
    if not checked:
        return cfg
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in checked.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[key] = value
    for head, sub in nested.items():
        top[head] = _replace_nested(getattr(cfg, head), sub)
    try:
        return dataclasses.replace(cfg, **top)
    except (TypeError, ValueError) as e:  # a config's own __post_init__ check
        raise InvalidOverridesError(
            f"overrides rejected by the config: {e}", details={"key": sorted(checked)}
        ) from None


def _replace_nested(obj: Any, sub: dict[str, Any]) -> Any:
    direct: dict[str, Any] = {}
    deeper: dict[str, dict[str, Any]] = {}
    for key, value in sub.items():
        head, _, rest = key.partition(".")
        if rest:
            deeper.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, d in deeper.items():
        direct[head] = _replace_nested(getattr(obj, head), d)
    return dataclasses.replace(obj, **direct)


def _short_value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int) and v >= 1000 and v % 1000 == 0:
        return f"{v // 1000}k"
    if isinstance(v, float):
        return f"{v:g}".replace(".", "p").replace("-", "m")
    if isinstance(v, (list, tuple)):
        return "x".join(_short_value(x) for x in v)
    return "".join(c if c.isalnum() else "_" for c in str(v))


def run_slug(model: str, preset: str, overrides: dict[str, Any]) -> str:
    """A file-name-safe name that encodes a run's parameters: ``fusion-fast-res192-faces40k-tex1024``."""
    parts = [model, preset]
    for key in sorted(overrides):
        label = SLUG_LABELS.get(key) or key.replace(".", "_")
        parts.append(f"{label}{_short_value(overrides[key])}")
    return "-".join(parts)

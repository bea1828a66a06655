"""One registry for every kind of piece: name → (config dataclass, factory).

    @register("update", "momentum", MomentumConfig)
    class Momentum: ...

    build("update", {"name": "momentum", "lr": 1e-5, "beta": 0.9})

A spec is a JSON-ready dict, ``{"name": ..., **config fields}``: run configs, trajectories and
tuner headers store specs, and everything that reads them rebuilds the pieces from here. CLI
flags and their help come from the registered configs' fields (``piece_fields``).
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, asdict, fields

from zoft.errors import ZoftError

KINDS = ("estimator", "perturbation", "update", "noise", "task")
_TABLES: dict[str, dict[str, tuple[type | None, object]]] = {kind: {} for kind in KINDS}
# the modules whose import registers the built-in pieces
_BUILTIN = ("zoft.estimators", "zoft.perturbations", "zoft.magnitude_mask", "zoft.block_scales", "zoft.scaled_mask",
            "zoft.updates",
            "zoft.momentum",
            "zoft.noise", "zoft.tasks")


def register(kind: str, name: str, config_cls: type | None = None):
    """Decorator (or, called on an object, a plain registration) of a piece under ``name``."""
    if kind not in _TABLES:
        raise KeyError(f"unknown kind {kind!r}; kinds are {KINDS}")
    if name != name.lower() or not name.replace("_", "").isalnum():
        raise KeyError(f"piece names are lowercase snake_case, got {name!r}")

    def deco(make):
        if name in _TABLES[kind]:
            raise KeyError(f"{kind} {name!r} is already registered")
        _TABLES[kind][name] = (config_cls, make)
        return make

    return deco


def _table(kind: str) -> dict:
    for module in _BUILTIN:
        importlib.import_module(module)
    return _TABLES[kind]


def names(kind: str) -> list[str]:
    return sorted(_table(kind))


def entry(kind: str, name: str) -> tuple[type | None, object]:
    table = _table(kind)
    if name not in table:
        raise ZoftError(f"unknown {kind} {name!r}; choose from {', '.join(sorted(table))}")
    return table[name]


def config(kind: str, spec: dict):
    """The validated config dataclass of a spec; unknown or invalid fields are a ZoftError."""
    spec = dict(spec)
    name = spec.pop("name")
    cfg_cls, _ = entry(kind, name)
    known = {f.name for f in fields(cfg_cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ZoftError(f"{kind} {name!r}: unknown settings {unknown}; known: {', '.join(sorted(known))}")
    return cfg_cls(**spec)


def build(kind: str, spec: dict):
    """The piece a spec describes, e.g. build("estimator", {"name": "kernel", "eps": 1e-2})."""
    _, make = entry(kind, spec["name"])
    return make(config(kind, spec))


def full_spec(kind: str, spec: dict) -> dict:
    """The spec with every default filled in: what runs record, so two runs compare exactly."""
    return {"name": spec["name"], **asdict(config(kind, spec))}


def piece_fields(kind: str) -> dict[str, tuple[str, object, str]]:
    """{field: (type name, default, help)} over every registered piece of a kind (a field shared
    by several pieces, like eps, is one flag); the first piece's default and help win."""
    out: dict[str, tuple[str, object, str]] = {}
    for name in names(kind):
        cfg_cls, _ = _TABLES[kind][name]
        for f in fields(cfg_cls) if cfg_cls else ():
            if f.name not in out:
                default = f.default if f.default is not MISSING else None
                kind_name = f.type if isinstance(f.type, str) else f.type.__name__
                out[f.name] = (kind_name, default, f.metadata.get("help", f"{name}: default {default}"))
    return out

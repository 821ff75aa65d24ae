"""Search spaces as data: a TOML file declares each sampled parameter and its range.

This module only parses and validates (without importing torch); `study/session.py` turns a
`Space` into Optuna's suggestions.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import SpaceError
from .specs import (ACTIVATION_NAMES, FAMILIES, INITS, KERNEL_SIZES, MAX_CONV_BLOCKS, OPTIMIZERS, POOLINGS,
                    SCHEDULES)

DEFAULT_SPACE_PATH = Path("studies/mlp.toml")
SHIPPED_SPACES = ("mlp", "mlp-wide", "cnn")  # hpsearch/spaces/NAME.toml; `--space cnn` finds studies/cnn.toml or this

# Every parameter a space may name: its Python type and the values that make sense.
_RULES: dict[str, tuple[type, object]] = {
    "num_layers": (int, lambda v: 1 <= v <= 32),
    "layer_size": (int, lambda v: 1 <= v <= 16384),
    "activation": (str, set(ACTIVATION_NAMES)),
    "dropout": (float, lambda v: 0.0 <= v < 1.0),
    "batch_norm": (bool, {False, True}),
    "optimizer": (str, set(OPTIMIZERS)),
    "lr": (float, lambda v: 0.0 < v <= 10.0),
    "weight_decay": (float, lambda v: 0.0 <= v <= 10.0),
    "batch_size": (int, lambda v: 1 <= v <= 65536),
    "momentum": (float, lambda v: 0.0 <= v < 1.0),
    "schedule": (str, set(SCHEDULES)),
    "label_smoothing": (float, lambda v: 0.0 <= v <= 0.5),
    "init": (str, set(INITS)),
    "augment_rotate": (float, lambda v: 0.0 <= v <= 180.0),
    "augment_shift": (float, lambda v: 0.0 <= v <= 8.0),
    "family": (str, set(FAMILIES)),
    "conv_blocks": (int, lambda v: 1 <= v <= MAX_CONV_BLOCKS),
    "channels": (int, lambda v: 1 <= v <= 1024),
    "kernel_size": (int, set(KERNEL_SIZES)),
    "pooling": (str, set(POOLINGS)),
    "conv_dropout": (float, lambda v: 0.0 <= v < 1.0),
}
# Parameters only a CNN has: naming one in a space that can only build MLPs is a mistake.
_CNN_ONLY = ("conv_blocks", "channels", "kernel_size", "pooling", "conv_dropout")
_KINDS = ("int", "float", "categorical")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def to_dict(self) -> dict:
        d = {"type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high)
            if self.log:
                d["log"] = True
            if self.step is not None:
                d["step"] = self.step
        return d


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    fixed: dict = field(default_factory=dict)
    source: str = ""
    # [[start]] tables: full assignments of the sampled parameters that a new study runs first
    starts: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        """What the study measures (its identity): the starting points are not part of it."""
        return {"params": {p.name: p.to_dict() for p in self.params}, "fixed": dict(self.fixed)}

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def families(self) -> tuple[str, ...]:
        """The model families this space can build: fixed, sampled, or the default mlp."""
        for p in self.params:
            if p.name == "family":
                return tuple(p.choices)
        return (self.fixed.get("family", "mlp"),)


def _cut(text: str, limit: int = 60) -> str:
    """Text as an error shows it: a 2 MB string in a space file is not echoed back whole."""
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value) -> str:
    return _cut(repr(value))


def _check_value(name: str, value, where: str):
    typ, ok = _RULES[name]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise SpaceError(f"{where}: {name} must be {typ.__name__}, got {_short(value)}")
    valid = value in ok if isinstance(ok, set) else ok(value)
    if not valid or (isinstance(value, float) and not math.isfinite(value)):
        allowed = f"one of {', '.join(map(str, sorted(ok)))}" if isinstance(ok, set) else "in range"
        raise SpaceError(f"{where}: {name} = {_short(value)} is not {allowed}")
    return value


def _parse_param(name: str, spec: dict, where: str) -> Param:
    if name not in _RULES:
        raise SpaceError(f"{where}: unknown parameter {_short(name)}; known: {', '.join(_RULES)}")
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: [params.{name}] must be a table")
    kind = spec.get("type")
    if kind not in _KINDS:
        raise SpaceError(f"{where}: {name}.type must be one of {', '.join(_KINDS)}, got {_short(kind)}")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    extra = set(spec) - allowed
    if extra:
        raise SpaceError(f"{where}: {name} has unexpected keys {_cut(', '.join(sorted(extra)))} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: {name}.choices must be a non-empty list")
        choices = tuple(_check_value(name, c, where) for c in choices)
        if len(set(choices)) != len(choices):
            raise SpaceError(f"{where}: {name}.choices has duplicates")
        return Param(name, kind, choices=choices)
    typ = _RULES[name][0]
    if typ is bool:
        raise SpaceError(f"{where}: {name} is true or false: a categorical parameter (choices = [false, true]), not {kind}")
    if (kind == "int") != (typ is int):
        raise SpaceError(f"{where}: {name} is {'an int' if typ is int else 'a float or categorical'} parameter, not {kind}")
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: {name} needs low and high")
    low, high = _check_value(name, spec["low"], where), _check_value(name, spec["high"], where)
    if low > high:
        raise SpaceError(f"{where}: {name}.low ({low}) is above high ({high})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: {name}.log must be true or false")
    if log and low <= 0:
        raise SpaceError(f"{where}: {name} has log = true, so low must be > 0 (got {low})")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise SpaceError(f"{where}: {name}.step must be a positive number")
        if log:
            raise SpaceError(f"{where}: {name} cannot have both log and step")
        if kind == "int" and step != int(step):  # Optuna would refuse it only at the first trial
            raise SpaceError(f"{where}: {name} is an int parameter, so its step must be a whole number (got {step})")
    return Param(name, kind, low, high, log, step)


def parse_space(text: str, source: str = "<string>") -> Space:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpaceError(f"{source} is not valid TOML: {exc}") from None
    extra = set(doc) - {"params", "fixed", "start"}
    if extra:
        raise SpaceError(f"{source}: unexpected top-level keys {_cut(', '.join(sorted(extra)))} "
                         f"(use [params.NAME], [fixed] and [[start]])")
    params_doc = doc.get("params", {})
    fixed_doc = doc.get("fixed", {})
    if not isinstance(params_doc, dict) or not params_doc:
        raise SpaceError(f"{source}: declares no [params.NAME] tables")
    if not isinstance(fixed_doc, dict):
        raise SpaceError(f"{source}: [fixed] must be a table")
    params = tuple(_parse_param(name, spec, source) for name, spec in params_doc.items())
    fixed = {}
    for name, value in fixed_doc.items():
        if name not in _RULES:
            raise SpaceError(f"{source}: unknown fixed setting {_short(name)}; known: {', '.join(_RULES)}")
        if name in params_doc:
            raise SpaceError(f"{source}: {name} is both sampled and fixed")
        fixed[name] = _check_value(name, value, source)
    space = Space(params, fixed, source, _parse_starts(doc.get("start", []), params, source))
    _check_family(space)
    return space


def _check_family(space: Space) -> None:
    if "cnn" in space.families:
        if "batch_norm" in space.names or space.fixed.get("batch_norm"):
            raise SpaceError(f"{space.source}: batch_norm only applies to the mlp family (the cnn trainer has none)")
        return
    named = [n for n in _CNN_ONLY if n in space.names or n in space.fixed]
    if named:
        raise SpaceError(f"{space.source}: {', '.join(named)} only apply to the cnn family; "
                         f"add family = \"cnn\" to [fixed] (see hpsearch/spaces/cnn.toml)")


def space_from_dict(stored: dict, source: str) -> Space:
    """The space a study stored (`Space.to_dict()`), to continue it without its file; no starts."""
    if not isinstance(stored, dict) or not isinstance(stored.get("params"), dict):
        raise SpaceError(f"{source}: the stored search space is damaged; rerun with --space FILE")
    params = tuple(_parse_param(name, spec, source) for name, spec in stored["params"].items())
    fixed = {name: _check_value(name, value, source) for name, value in (stored.get("fixed") or {}).items()}
    return Space(params, fixed, source)


def _parse_starts(starts, params: tuple[Param, ...], source: str) -> tuple[dict, ...]:
    """[[start]] tables: each sets every sampled parameter to a value inside its range or choices."""
    if not isinstance(starts, list) or not all(isinstance(s, dict) for s in starts):
        raise SpaceError(f"{source}: starting configurations must be [[start]] tables")
    names = [p.name for p in params]
    out = []
    for i, start in enumerate(starts, 1):
        where = f"{source}: [[start]] {i}"
        unknown = sorted(set(start) - set(names))
        if unknown:
            raise SpaceError(f"{where}: {', '.join(unknown)} is not a sampled parameter of this space "
                             f"(sampled: {', '.join(names)})")
        missing = [n for n in names if n not in start]
        if missing:
            raise SpaceError(f"{where}: sets no value for {', '.join(missing)}")
        out.append({p.name: _check_in_param(p, start[p.name], where) for p in params})
    if len({tuple(sorted(s.items())) for s in out}) != len(out):
        raise SpaceError(f"{source}: two [[start]] tables are the same configuration")
    return tuple(out)


def _check_in_param(param: Param, value, where: str):
    value = _check_value(param.name, value, where)
    if param.kind == "categorical":
        if value not in param.choices:
            raise SpaceError(f"{where}: {param.name} = {_short(value)} is not one of the choices {list(param.choices)}")
        return value
    if not param.low <= value <= param.high:
        raise SpaceError(f"{where}: {param.name} = {_short(value)} is outside [{param.low}, {param.high}]")
    if param.step and not math.isclose((value - param.low) / param.step, round((value - param.low) / param.step)):
        raise SpaceError(f"{where}: {param.name} = {_short(value)} is not on the grid of step {param.step} from {param.low}")
    return value


def load_space(path: str | Path | None = None) -> Space:
    """Read a space file. With no path: studies/mlp.toml if present, else the packaged default.

    A shipped space's name (`mlp`, `cnn`) stands for studies/NAME.toml if present, else the
    packaged copy, so `--space cnn` works from any directory.
    """
    if path is None:
        path = "mlp"
    if str(path) in SHIPPED_SPACES and not Path(path).is_file():
        local = DEFAULT_SPACE_PATH.with_name(f"{path}.toml")
        if not local.is_file():
            text = resources.files("hpsearch").joinpath(f"spaces/{path}.toml").read_text()
            return parse_space(text, f"hpsearch/spaces/{path}.toml")
        path = local
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"cannot read search space {path}: {exc}") from None
    return parse_space(text, str(path))

"""Schedules for layer hyperparameters (IterNorm ``iterations``, SWBN ``whitening_rate``, ...).

A schedule maps training time to a value. Time is measured in ``unit``:

* ``"step"``: optimizer steps (``trainer.global_step``),
* ``"epoch"``: epochs, fractional within an epoch (epoch 1.5 is half-way through the 2nd),
* ``"fraction"``: fraction of the whole run, ``global_step / estimated_stepping_batches``.

Schedules are plain, picklable objects with explicit constructor arguments, so they can be
written in LightningCLI YAML either with ``class_path`` / ``init_args`` or as a plain dict with a
``type`` key (see :func:`from_config`)::

    iterations:
      class_path: lightning_whiten.schedules.Step
      init_args: {values: [3, 5, 7], milestones: [0.3, 0.6], unit: fraction}
    whitening_rate: {type: cosine, start: 1.0e-4, end: 1.0e-6, unit: fraction}
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

__all__ = [
    "Constant",
    "Cosine",
    "LayerScheduler",
    "Linear",
    "Piecewise",
    "Schedule",
    "Step",
    "TimeUnit",
    "from_config",
]

TimeUnit = Literal["step", "epoch", "fraction"]
_UNITS = ("step", "epoch", "fraction")


class Schedule(ABC):
    """A value as a function of training time measured in ``unit``."""

    def __init__(self, unit: TimeUnit = "step") -> None:
        if unit not in _UNITS:
            raise ValueError(f"{type(self).__name__}: unit must be one of {_UNITS}, got {unit!r}")
        self.unit = unit

    @abstractmethod
    def __call__(self, t: float) -> float:
        """The value at time ``t`` (in ``unit``)."""

    @abstractmethod
    def extremes(self) -> list[float]:
        """Every value the schedule can take at its breakpoints: its minimum and maximum are
        among them (used to validate bounds before training)."""

    def _repr_args(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = {**self._repr_args(), "unit": self.unit}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class Constant(Schedule):
    """Always ``value``."""

    def __init__(self, value: float, unit: TimeUnit = "step") -> None:
        super().__init__(unit)
        self.value = value

    def __call__(self, t: float) -> float:
        return self.value

    def extremes(self) -> list[float]:
        return [self.value]

    def _repr_args(self) -> dict[str, Any]:
        return {"value": self.value}


class Step(Schedule):
    """Piecewise constant: ``values[i]`` from ``milestones[i - 1]`` on (``values[0]`` before the
    first milestone). ``len(values) == len(milestones) + 1``."""

    def __init__(
        self, values: Sequence[float], milestones: Sequence[float], unit: TimeUnit = "step"
    ) -> None:
        super().__init__(unit)
        values, milestones = list(values), list(milestones)
        if len(values) != len(milestones) + 1:
            raise ValueError(
                f"Step: needs one more value than milestones, got {len(values)} values and "
                f"{len(milestones)} milestones"
            )
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ValueError(f"Step: milestones must increase, got {milestones}")
        self.values = values
        self.milestones = milestones

    def __call__(self, t: float) -> float:
        return self.values[bisect.bisect_right(self.milestones, t)]

    def extremes(self) -> list[float]:
        return list(self.values)

    def _repr_args(self) -> dict[str, Any]:
        return {"values": self.values, "milestones": self.milestones}


class Linear(Schedule):
    """``start`` until ``begin``, linear to ``end`` at ``stop``, then ``end``."""

    def __init__(
        self,
        start: float,
        end: float,
        begin: float = 0.0,
        stop: float = 1.0,
        unit: TimeUnit = "fraction",
    ) -> None:
        super().__init__(unit)
        if stop <= begin:
            raise ValueError(f"{type(self).__name__}: stop ({stop}) must be after begin ({begin})")
        self.start, self.end, self.begin, self.stop = start, end, begin, stop

    def _progress(self, t: float) -> float:
        return min(max((t - self.begin) / (self.stop - self.begin), 0.0), 1.0)

    def __call__(self, t: float) -> float:
        return self.start + (self.end - self.start) * self._progress(t)

    def extremes(self) -> list[float]:
        return [self.start, self.end]

    def _repr_args(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "begin": self.begin, "stop": self.stop}


class Cosine(Linear):
    """``start`` until ``begin``, half-cosine to ``end`` at ``stop``, then ``end``."""

    def __call__(self, t: float) -> float:
        p = self._progress(t)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))


class Piecewise(Schedule):
    """Through the points ``[(t0, v0), (t1, v1), ...]``: linear between them (or held constant
    with ``interpolation="step"``), constant before the first and after the last."""

    def __init__(
        self,
        points: Sequence[Sequence[float]],
        interpolation: Literal["linear", "step"] = "linear",
        unit: TimeUnit = "step",
    ) -> None:
        super().__init__(unit)
        pts = [(float(p[0]), float(p[1])) for p in points]
        if not pts:
            raise ValueError("Piecewise: needs at least one point")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(pts)):
            raise ValueError(f"Piecewise: point times must increase, got {[p[0] for p in pts]}")
        if interpolation not in ("linear", "step"):
            raise ValueError(
                f"Piecewise: interpolation must be 'linear' or 'step', got {interpolation!r}"
            )
        self.points = pts
        self.interpolation = interpolation

    def __call__(self, t: float) -> float:
        times = [p[0] for p in self.points]
        i = bisect.bisect_right(times, t)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points) or self.interpolation == "step":
            return self.points[i - 1][1]
        (t0, v0), (t1, v1) = self.points[i - 1], self.points[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    def extremes(self) -> list[float]:
        return [v for _, v in self.points]

    def _repr_args(self) -> dict[str, Any]:
        return {"points": self.points, "interpolation": self.interpolation}


_TYPES: dict[str, type[Schedule]] = {
    "constant": Constant,
    "step": Step,
    "linear": Linear,
    "cosine": Cosine,
    "piecewise": Piecewise,
}


def from_config(config: Schedule | dict[str, Any] | float | int) -> Schedule:
    """A schedule from a :class:`Schedule`, a number (constant) or a config dict.

    Dicts use either ``{"type": "step", **init_args}`` or jsonargparse's
    ``{"class_path": "lightning_whiten.schedules.Step", "init_args": {...}}``.
    """
    if isinstance(config, Schedule):
        return config
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        return Constant(config)
    if not isinstance(config, dict):
        raise TypeError(f"a schedule is a Schedule, a number or a dict, got {config!r}")
    config = dict(config)
    if "class_path" in config:
        name = str(config.pop("class_path")).rsplit(".", 1)[-1].lower()
        kwargs = dict(config.pop("init_args", {}) or {})
    elif "type" in config:
        name = str(config.pop("type")).lower()
        kwargs = config
    else:
        raise ValueError(
            f"a schedule dict needs a 'type' (one of {sorted(_TYPES)}), got {config!r}"
        )
    if name not in _TYPES:
        raise ValueError(f"unknown schedule type {name!r}: choose one of {sorted(_TYPES)}")
    return _TYPES[name](**kwargs)


# ------------------------------------------------------------------------------------------
# Binding schedules to the layers of a model
# ------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def schedulable_attributes(module: Any) -> tuple[str, ...] | None:
    """What a schedule may change on ``module``: its declared ``schedulable`` attributes, ``eps``
    and ``momentum`` for torch's normalization layers, ``None`` (any numeric attribute) else."""
    declared = getattr(module, "schedulable", None)
    if declared is not None:
        return tuple(declared)
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase

    if isinstance(module, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
        return ("eps", "momentum")
    return None


def _schedulable(module: Any, attribute: str) -> bool:
    allowed = schedulable_attributes(module)
    return _is_number(getattr(module, attribute, None)) and (
        allowed is None or attribute in allowed
    )


def _check_generic(module: Any, attribute: str, value: float) -> None:
    # torch's own layers do not validate assignments; these bounds hold for any layer.
    if attribute == "eps" and not value > 0:
        raise ValueError(f"{type(module).__name__}: eps must be > 0, got {value}")
    if attribute == "momentum" and not 0 <= value <= 1:
        raise ValueError(f"{type(module).__name__}: momentum must be in [0, 1], got {value}")


class LayerScheduler:
    """Applies schedules to the attributes of a model's layers.

    Args:
        schedules: ``{key: schedule}``. ``key`` is an attribute name (``"iterations"``) applied
            to every module that has that numeric attribute, or ``"attribute@pattern"`` to
            restrict it to modules whose qualified name (or an ancestor's) matches the glob
            ``pattern`` (``"iterations@layer4"``). A schedule may be a :class:`Schedule`, a
            number or a config dict (:func:`from_config`).
    """

    def __init__(self, schedules: dict[str, Any] | None = None) -> None:
        self.schedules: dict[str, Schedule] = {}
        for key, config in (schedules or {}).items():
            attribute, _ = self.split(key)
            if not attribute.isidentifier():
                raise ValueError(
                    f"schedule key {key!r}: expected 'attribute' or 'attribute@pattern'"
                )
            self.schedules[key] = from_config(config)
        self._targets: dict[str, list[tuple[str, Any]]] = {}
        self.current: dict[str, float] = {}

    @staticmethod
    def split(key: str) -> tuple[str, str | None]:
        attribute, _, pattern = key.partition("@")
        return attribute, pattern or None

    def bind(
        self, model: Any, known_attributes: dict[str, list[str]] | None = None
    ) -> LayerScheduler:
        """Find the modules each schedule drives and validate every value it can take.

        Raises:
            ValueError: an attribute no matched module has (listing what the layers do have),
                a pattern that matches nothing, or a value the layer would reject.
        """
        import difflib

        from .patterns import in_scope

        known_attributes = known_attributes or {}
        named = list(model.named_modules())
        self._targets = {}
        for key, schedule in self.schedules.items():
            attribute, pattern = self.split(key)

            scoped = [(n, m) for n, m in named if n and (pattern is None or in_scope(n, pattern))]
            if pattern is not None and not scoped:
                names = [n for n, _ in named if n]
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
                close += [n for n in names if n.endswith("." + pattern)][:3]
                hint = f"; close names: {', '.join(dict.fromkeys(close))}" if close else ""
                raise ValueError(
                    f"schedule {key!r}: pattern {pattern!r} matches no module (patterns are "
                    f"qualified names inside the model){hint}"
                )
            targets = [(n, m) for n, m in scoped if _schedulable(m, attribute)]
            if not targets:
                where = f" matching {pattern!r}" if pattern else ""
                owners = [cls for cls, attrs in known_attributes.items() if attribute in attrs]
                if owners:
                    raise ValueError(
                        f"schedule {key!r}: no layer{where} has the attribute {attribute!r} "
                        f"(it belongs to {', '.join(owners)}, which this model does not use)"
                    )
                every = sorted({a for attrs in known_attributes.values() for a in attrs})
                close = difflib.get_close_matches(attribute, every, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"schedule {key!r}: unknown attribute {attribute!r}: no module{where} has a "
                    f"schedulable attribute of that name{hint} (the layers have: {', '.join(every)})"
                )
            for value in schedule.extremes():
                for cls in {type(m) for _, m in targets}:
                    probe = copy.copy(next(m for _, m in targets if type(m) is cls))
                    cast = (
                        round(value) if isinstance(getattr(probe, attribute), int) else float(value)
                    )
                    try:
                        _check_generic(probe, attribute, cast)
                        setattr(probe, attribute, cast)
                    except (ValueError, TypeError) as err:
                        raise ValueError(
                            f"schedule {key!r} reaches the value {value!r}: {err}"
                        ) from None
            # The probes were shallow copies: a layer that mirrors an attribute into a buffer
            # (WhiteningNorm's momentum) shares that buffer with them; set the values back.
            for _, m in targets:
                setattr(m, attribute, getattr(m, attribute))
            self._targets[key] = targets
        return self

    def scheduled_attributes(self) -> dict[str, dict[str, Any]]:
        """``{module name: {attribute: current value}}`` of every attribute a schedule drives."""
        out: dict[str, dict[str, Any]] = {}
        for key, targets in self._targets.items():
            attribute, _ = self.split(key)
            for name, module in targets:
                out.setdefault(name, {})[attribute] = getattr(module, attribute)
        return out

    def values(self, times: dict[str, float]) -> dict[str, float]:
        """The value of every schedule at ``times`` (``{"step": ..., "epoch": ..., "fraction": ...}``)."""
        out = {}
        for key, schedule in self.schedules.items():
            value = schedule(times[schedule.unit])
            targets = self._targets.get(key, [])
            if targets and isinstance(getattr(targets[0][1], self.split(key)[0]), int):
                value = round(value)
            out[key] = value
        return out

    def apply(self, times: dict[str, float], record: bool = True) -> dict[str, float]:
        """Set every scheduled attribute for ``times``; returns the values that changed
        (with ``record=False``: sets them without recording them as ``current``)."""
        changed = {}
        for key, value in self.values(times).items():
            attribute, _ = self.split(key)
            for _, module in self._targets[key]:
                if getattr(module, attribute) != value:
                    setattr(module, attribute, value)
            if record and self.current.get(key) != value:
                changed[key] = value
                self.current[key] = value
        return changed

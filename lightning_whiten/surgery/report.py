"""What a conversion did (or, as a dry run, will do), as data, a rich table and a plain dict."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .spec import ConversionSpec

__all__ = ["ConversionReport", "ReplacedModule", "SkippedModule", "render_table"]


@dataclass(frozen=True)
class ReplacedModule:
    """A module that was (or will be) replaced."""

    name: str
    old_type: str
    new_type: str
    num_features: int
    group_sizes: tuple[int, ...]
    notes: tuple[str, ...] = ()
    producer: str | None = None  # what computes its input, and how that was found

    @property
    def groups(self) -> str:
        """Compact group layout, e.g. ``"4x16"`` or ``"2x16+8"`` (empty for per-channel layers)."""
        sizes = self.group_sizes
        if not sizes:
            return ""
        full = [s for s in sizes if s == sizes[0]]
        text = f"{len(full)}x{sizes[0]}"
        return text + "".join(f"+{s}" for s in sizes[len(full) :])


@dataclass(frozen=True)
class SkippedModule:
    """A candidate module that was (or will be) left as it was, and why."""

    name: str
    type: str
    num_features: int | None
    reason: str
    producer: str | None = None  # what computes its input, when that decided the skip


@dataclass
class ConversionReport:
    """The result of :func:`lightning_whiten.convert`, or of a dry run
    (:meth:`~lightning_whiten.surgery.ConversionPlan.report`).

    Attributes:
        layer: name of the layer class converted to.
        spec: the :class:`~lightning_whiten.surgery.ConversionSpec` (enough to redo the
            conversion on a fresh model; checkpoints store it).
        replaced: the replaced modules, in module order.
        skipped: the candidate modules left alone, with the reason.
        inserted: new layers at the input of the modules ``spec.insert`` names.
        removed: normalization layers removed after converted convolutions
            (``spec.drop_following_norm``); ``new_type`` is what is left (``Identity``, or a
            fused layer's activation).
        trace: how producers were found: ``"traced"``, ``"failed: <error>"`` (module order was
            used instead) or ``"not needed"``.
        applied: ``False`` for a dry run.
    """

    layer: str
    spec: ConversionSpec
    replaced: list[ReplacedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    trace: str = "not needed"
    applied: bool = True
    inserted: list[ReplacedModule] = field(default_factory=list)
    removed: list[ReplacedModule] = field(default_factory=list)

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Flat counts for logging as hyperparameters."""
        out = {"replaced": self.num_replaced, "skipped": self.num_skipped}
        if self.removed:
            out["removed"] = len(self.removed)
        for old_type, n in Counter(r.old_type for r in self.replaced).items():
            out[f"replaced/{old_type}"] = n
        for t, n in Counter(s.type for s in self.skipped).items():
            out[f"skipped/{t}"] = n
        return out

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-serializable dict (for loggers and checkpoints)."""
        return {
            "layer": self.layer,
            "spec": self.spec.to_dict(),
            "replaced": [
                {**asdict(r), "group_sizes": list(r.group_sizes), "notes": list(r.notes)}
                for r in self.replaced
            ],
            "skipped": [asdict(s) for s in self.skipped],
            "trace": self.trace,
            "applied": self.applied,
            "inserted": [
                {**asdict(r), "group_sizes": list(r.group_sizes), "notes": list(r.notes)}
                for r in self.inserted
            ],
            "removed": [
                {**asdict(r), "group_sizes": list(r.group_sizes), "notes": list(r.notes)}
                for r in self.removed
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, trusted: bool = False) -> ConversionReport:
        from .spec import ConversionSpec

        def replaced(rows: list[dict[str, Any]]) -> list[ReplacedModule]:
            return [
                ReplacedModule(
                    **{
                        **r,
                        "group_sizes": tuple(r["group_sizes"]),
                        "notes": tuple(r.get("notes", ())),
                    }
                )
                for r in rows
            ]

        return cls(
            layer=data["layer"],
            spec=ConversionSpec.from_dict(data["spec"], trusted=trusted),
            replaced=replaced(data["replaced"]),
            skipped=[SkippedModule(**s) for s in data["skipped"]],
            trace=data.get("trace", "not needed"),
            applied=data.get("applied", True),
            inserted=replaced(data.get("inserted", [])),
            removed=replaced(data.get("removed", [])),
        )

    def title(self) -> str:
        verb = "" if self.applied else "plan (dry run): "
        text = (
            f"lightning-whiten {verb}{self.num_replaced} modules -> {self.layer}, "
            f"{self.num_skipped} skipped"
        )
        if self.inserted:
            text += f", {len(self.inserted)} inserted"
        if self.removed:
            text += f", {len(self.removed)} removed"
        if self.trace.startswith("failed"):
            text += f"; producers from module order, the trace {self.trace}"
        return text

    def table(self):
        """A :class:`rich.table.Table` of replaced and skipped modules. A note shared by several
        rows is printed once below the table and referred to as ``[k]`` in the rows."""
        from rich.table import Table

        notes: list[str] = []

        def refer(texts: list[str]) -> str:
            refs = []
            for text in texts:
                if sum(text in row for row in all_notes) > 1:
                    if text not in notes:
                        notes.append(text)
                    refs.append(f"[{notes.index(text) + 1}]")
                else:
                    refs.append(text)
            return "; ".join(refs)

        rows = [*self.replaced, *self.inserted, *self.removed]
        all_notes = [list(r.notes) for r in rows] + [[s.reason] for s in self.skipped]
        table = Table(title=self.title(), title_justify="left")
        for column in ("module", "was", "now", "channels", "groups", "producer", "note"):
            table.add_column(column, overflow="fold")
        for r in rows:
            table.add_row(
                r.name, r.old_type, r.new_type, str(r.num_features), r.groups,
                r.producer or "", refer(list(r.notes)).replace("[", r"\["),
            )  # fmt: skip
        for s in self.skipped:
            table.add_row(
                s.name, s.type, "[dim]unchanged[/dim]",
                "" if s.num_features is None else str(s.num_features), "", s.producer or "",
                refer([s.reason]).replace("[", r"\["),
            )  # fmt: skip
        if notes:
            table.caption = "\n".join(f"[{i}] {text}" for i, text in enumerate(notes, 1)).replace(
                "[", r"\["
            )
            table.caption_justify = "left"
        return table

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        return render_table(self.table())

    def __repr__(self) -> str:
        return (
            f"ConversionReport(layer={self.layer!r}, replaced={self.num_replaced}, "
            f"skipped={self.num_skipped}{'' if self.applied else ', dry run'})"
        )


def render_table(table: Any, file: Any = None) -> str:
    """Render a rich table to text: at the terminal's width on a terminal, and wide enough for
    every cell when piped to a file or a log (so module names are never split mid-word)."""
    from rich.console import Console
    from rich.measure import Measurement

    stream = file if file is not None else sys.stdout
    terminal = hasattr(stream, "isatty") and stream.isatty()
    if terminal:
        width = Console(file=stream).width
    else:
        probe = Console(width=10_000, color_system=None)
        width = max(80, Measurement.get(probe, probe.options, table).maximum + 2)
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get()

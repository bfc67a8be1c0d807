"""Loading checkpoints of converted models without the callback (plain PyTorch)."""

from __future__ import annotations

import inspect
import os
import pickle
import zipfile
from typing import Any

import torch
from torch import nn

from .registry import family_of
from .schedules import schedulable_attributes
from .surgery import ConversionSpec, convert

__all__ = [
    "CHECKPOINT_KEY",
    "WhitenedModuleMixin",
    "apply_layer_attributes",
    "check_checkpoint_file",
    "check_resume",
    "conversion_spec",
    "layer_attributes",
    "load_checkpoint",
    "load_converted",
    "restore_conversion",
    "unconverted_layers",
]

#: Key under which ``WhiteningCallback`` stores the conversion in a Lightning checkpoint.
CHECKPOINT_KEY = "lightning_whiten"


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file.

    ``weights_only=True`` is passed explicitly (an environment variable can otherwise turn the
    default back into full unpickling, which runs code the file names).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except UNREADABLE as err:
        raise unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} holds a {type(checkpoint).__name__}, not a dict"
        )
    return checkpoint


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise the error :func:`load_checkpoint` would for a file that is missing, empty,
    truncated or not a torch checkpoint, without reading a well-formed checkpoint's data.

    A file ``torch.save`` wrote is a zip archive with a ``<name>/data.pkl`` record; its
    directory sits at the end of the file, so a truncated file is not a zip archive. Such a
    file is accepted after reading only the directory; anything else (including the legacy
    non-zip format) is read with :func:`load_checkpoint`, so the message is the same.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is empty, truncated, corrupted or not a checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} is not a file")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return
    except (OSError, zipfile.BadZipFile):
        pass  # read it below, for load_checkpoint's words
    load_checkpoint(path)


#: What ``torch.load`` raises for a file that is empty, truncated or not a checkpoint (the
#: weights-only unpickler fails on stray bytes with IndexError, KeyError or ValueError).
UNREADABLE = (
    EOFError, OSError, RuntimeError, pickle.UnpicklingError, IndexError, KeyError, ValueError
)  # fmt: skip


def unreadable(path: str | os.PathLike, err: BaseException) -> ValueError:
    """The error for a checkpoint file that cannot be read, saying what is wrong with it."""
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size == 0:
        return ValueError(f"checkpoint {os.fspath(path)!r} is empty (0 bytes)")
    return ValueError(
        f"checkpoint {os.fspath(path)!r} ({size} bytes) cannot be read: it is truncated, "
        f"corrupted or not a torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})"
    )


def conversion_spec(checkpoint: dict[str, Any], *, trusted: bool = False) -> ConversionSpec:
    """The conversion recorded in a (loaded) checkpoint by ``WhiteningCallback``.

    Names in it resolve only through the registry of families and modules already imported,
    unless ``trusted``.
    """
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not entry or "spec" not in entry:
        raise ValueError(
            "the checkpoint holds no whitening conversion: it was not written by a Trainer with "
            "WhiteningCallback (load it with load_state_dict into the original model instead)"
        )
    return ConversionSpec.from_dict(entry["spec"], trusted=trusted)


def check_resume(checkpoint: dict[str, Any], spec: ConversionSpec | None) -> None:
    """Refuse, with the reason, to resume ``checkpoint`` into a model that will not match it:
    ``spec`` is the conversion the resuming run applies (``None``: no conversion).

    Raises:
        ValueError: a BatchNorm checkpoint resumed with a conversion, a converted checkpoint
            resumed without one, or one family resumed as another.
    """
    entry = checkpoint.get(CHECKPOINT_KEY)
    written = entry.get("spec") if isinstance(entry, dict) else None
    if spec is None:
        if written is not None:
            raise ValueError(
                "this checkpoint was written by a model converted with WhiteningCallback "
                f"(layer {written.get('layer')!r}): its state holds whitening layers. Add "
                "WhiteningCallback with the same settings to the Trainer to resume it, or load "
                "it with lightning_whiten.load_converted(YourModule, path)"
            )
        return
    if written is None:
        raise ValueError(
            "this checkpoint was written without WhiteningCallback (its model has the original "
            f"normalization layers), and resuming it with WhiteningCallback({spec.layer!r}) would "
            "load them into the converted layers. To start whitening from these weights, load "
            "them into the model (e.g. ImageClassifier(checkpoint_path=...) or "
            "load_state_dict) and fit without ckpt_path; to resume, drop the callback"
        )
    layer = written.get("layer")
    if isinstance(layer, str) and layer != spec.layer:
        try:
            same = ConversionSpec.from_dict(written).family is spec.family
        except (TypeError, ValueError):
            same = False
        if not same:
            raise ValueError(
                f"this checkpoint was converted to {layer!r} and WhiteningCallback converts to "
                f"{spec.layer!r}: resume with layer={layer!r}, or start a new run from its weights"
            )


def layer_attributes(model: nn.Module, scheduler: Any = None) -> dict[str, dict[str, Any]]:
    """``{module name: {attribute: value}}``: the schedulable attributes of every converted
    layer (``iterations``, ``eps``, ``whitening_rate``, ...) and every attribute ``scheduler``
    (a :class:`~lightning_whiten.schedules.LayerScheduler`) drives on other modules."""
    attributes: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        family = family_of(module)
        if family is not None and name:
            attributes[name] = {a: getattr(module, a) for a in family.schedulable}
    if scheduler is not None:
        for name, values in scheduler.scheduled_attributes().items():
            attributes.setdefault(name, {}).update(values)
    return attributes


def apply_layer_attributes(
    model: nn.Module, attributes: dict[str, dict[str, Any]], *, trusted: bool = False
) -> None:
    """Set the attributes recorded by :func:`layer_attributes` on a rebuilt model.

    Only what a schedule may change is accepted: the declared ``schedulable`` attributes of a
    layer, or ``eps``/``momentum`` of torch's normalization layers, with numeric values (a
    checkpoint cannot change a convolution's stride or any other structure). ``trusted``
    also accepts other numeric attributes a module already has (what a schedule may drive on
    modules that declare nothing).
    """
    if not isinstance(attributes, dict):
        raise ValueError(f"checkpoint attributes must be a dict, got {type(attributes).__name__}")
    for name, values in attributes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the checkpoint records attributes of {name!r}, which the rebuilt model lacks"
            ) from None
        declared = schedulable_attributes(module)
        for attribute, value in dict(values).items():
            current = getattr(module, attribute, None)
            if declared is not None:
                allowed = attribute in declared
            else:
                allowed = trusted and isinstance(current, (int, float))
            if not allowed:
                raise ValueError(
                    f"the checkpoint sets {attribute!r} on {name!r} ({type(module).__name__}), "
                    f"which is not a schedulable attribute of it (allowed: {list(declared or ())})"
                )
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (numeric or (value is None and attribute == "momentum")):
                raise ValueError(
                    f"the checkpoint sets {name}.{attribute} to {value!r}, not a number"
                )
            setattr(module, attribute, value)


def load_converted(
    module: nn.Module | type[nn.Module],
    checkpoint_path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    trust: bool = False,
    **init_kwargs: Any,
) -> nn.Module:
    """Rebuild the converted architecture stored in a checkpoint and load its weights strictly.

    Works without the callback and without a Trainer: the checkpoint records how the model was
    converted (a :class:`~lightning_whiten.surgery.ConversionSpec`), so the same conversion is
    redone on a freshly built model before loading, and the layer attributes schedules had
    reached (``iterations``, ``eps``, ...) are set back.

    The file is read with ``weights_only=True``; layer families and module types it names
    resolve only through the registry and modules already imported (``trust=True`` allows
    imports, for a file you trust that names your own layer by its class path), and only
    schedulable attributes are restored.

    Args:
        module: a LightningModule (or ``nn.Module``) class, instantiated from the checkpoint's
            ``hyper_parameters`` (and ``init_kwargs``), or an instance with the original
            (unconverted) architecture. ``configure_model`` is called if defined.
        checkpoint_path: a checkpoint written by a Trainer with ``WhiteningCallback``.
        map_location: passed to ``torch.load``.
        strict: passed to ``load_state_dict``.
        trust: let names in the checkpoint import modules.

    Returns:
        The converted module with the checkpoint's weights, in eval mode.
    """
    checkpoint = load_checkpoint(checkpoint_path, map_location)
    spec = conversion_spec(checkpoint, trusted=trust)
    if isinstance(module, type):
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.update(init_kwargs)
        signature = inspect.signature(module.__init__)
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            hparams = {k: v for k, v in hparams.items() if k in signature.parameters}
        module = module(**hparams)
    configure = getattr(module, "configure_model", None)
    if callable(configure):
        configure()
    convert(module, spec)
    apply_layer_attributes(module, checkpoint[CHECKPOINT_KEY].get("attributes", {}), trusted=trust)
    module.load_state_dict(checkpoint.get("state_dict", checkpoint), strict=strict)
    return module.eval()


def unconverted_layers(module: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Names of the layers a converted ``checkpoint`` holds as whitening (or other converted)
    layers that ``module`` does not: ``"net.1 (IterNorm, here BatchNorm2d)"``. Empty for a
    checkpoint without a conversion or a module converted as it was."""
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(entry, dict):
        return []
    report = entry.get("report") if isinstance(entry.get("report"), dict) else {}
    expected = {r["name"]: r.get("new_type", "?") for r in report.get("replaced", [])}
    expected.update(
        {f"{r['name']}.norm": r.get("new_type", "?") for r in report.get("inserted", [])}
    )
    if not report:  # no report: every layer whose attributes were recorded
        layer = str((entry.get("spec") or {}).get("layer", "?")).rsplit(".", 1)[-1]
        expected = dict.fromkeys(dict(entry.get("attributes") or {}), layer)
    out = []
    for name, new_type in expected.items():
        try:
            found = module.get_submodule(name)
        except AttributeError:
            out.append(f"{name} ({new_type}, missing here)")
            continue
        if family_of(found) is None:
            out.append(f"{name} ({new_type}, here {type(found).__name__})")
    return out


def restore_conversion(
    module: nn.Module, checkpoint: dict[str, Any], *, trust: bool = False
) -> bool:
    """Convert ``module`` as the model that wrote ``checkpoint`` was, before its state dict
    is loaded: the :class:`~lightning_whiten.surgery.ConversionSpec` stored by
    ``WhiteningCallback`` is redone and the layer attributes schedules had reached are set back
    (as :func:`load_converted` does). What :class:`WhitenedModuleMixin` runs in
    ``on_load_checkpoint``.

    Does nothing (returns ``False``) for a checkpoint without a conversion, or when ``module``
    already holds the converted layers (a resumed run, where the callback converted at setup).

    Returns:
        Whether ``module`` was converted.
    """
    entry = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(entry, dict) or "spec" not in entry:
        return False
    if not unconverted_layers(module, checkpoint) and (
        entry.get("report") or entry.get("attributes")
    ):
        return False
    convert(module, conversion_spec(checkpoint, trusted=trust))
    apply_layer_attributes(module, entry.get("attributes", {}), trusted=trust)
    return True


class WhitenedModuleMixin:
    """Makes ``MyModule.load_from_checkpoint(path)`` rebuild the converted layers of a
    checkpoint written with ``WhiteningCallback``: one line in the LightningModule,
    ``class MyModule(lw.WhitenedModuleMixin, pl.LightningModule)`` (the mixin first).

    Its ``on_load_checkpoint`` converts the freshly built module from the conversion stored in
    the checkpoint (:func:`restore_conversion`) before Lightning loads the state dict, then calls
    the next ``on_load_checkpoint``; a module that overrides the hook calls ``super()`` in it.
    When resuming a run (``trainer.fit(ckpt_path=...)`` with the callback) the module is
    already converted and the hook changes nothing.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_conversion(self, checkpoint)  # type: ignore[arg-type]
        parent = getattr(super(), "on_load_checkpoint", None)
        if callable(parent):
            parent(checkpoint)

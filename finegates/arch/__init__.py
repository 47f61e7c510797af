"""Model families: everything FineGates knows about one kind of Hugging Face classifier, in one module.

A family (:class:`Family`) says where the layers are, which linears of a layer are gated (the slots) and
which units are removed together, the classification head, the LoRA targets, how the exporter turns a
gated model into a smaller one, and which compressed modeling file is copied into checkpoints. Families
are looked up by ``config.model_type``:

>>> get_family("roberta").name
'bert'

Adding a family: one module here (subclass :class:`Family`, decorate it with :func:`register`, import it
at the end of this file), one compressed modeling file (``finegates/modeling_finegates_<name>.py``, torch +
transformers only) and one test parameter (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

from finegates.errors import ConfigError

if TYPE_CHECKING:
    from finegates.gated_model import LayerGates
    from finegates.pruning import ExportStats

KeepFn = Callable[[object], torch.Tensor]  # gate -> per-unit keep value (probability or indicator)


class UnsupportedModelError(ConfigError):
    """A model whose ``model_type`` no family handles. One line naming it and the accepted ones."""


class Family:
    """What FineGates knows about one model family. Subclasses fill in the class attributes and methods."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values of the HF models it handles
    compressed_model_type: ClassVar[str] = ""  # model_type of its exported (compressed) checkpoints
    slots: ClassVar[tuple[str, ...]] = ()  # the gated linears of one layer, in order
    coupled_rows: ClassVar[tuple[str, ...]] = ()  # slots with a row gate in the ``coupled`` layout
    lora_targets: ClassVar[tuple[str, ...]] = ()  # peft target_modules of the ``lora`` method
    modeling_file: ClassVar[Path]  # copied into every checkpoint as ``modeling_file.name``
    config_class_name: ClassVar[str] = ""
    model_class_name: ClassVar[str] = ""

    def max_tokens(self, config) -> int | None:
        """The longest input, in tokens, that a model of this family with ``config`` can take; None where the
        family has no fixed limit (rotary positions: longer inputs run, if less well)."""
        return None

    # ---- where things are
    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def layer_modules(self, layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """slot -> (parent module, attribute name) of the linear in that slot."""
        raise NotImplementedError

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The classification head (trains in every method)."""
        raise NotImplementedError

    def lora_modules_to_save(self, model: nn.Module) -> list[str]:
        """Module names peft trains in full next to the LoRA adapters (the head)."""
        raise NotImplementedError

    def layer_meta(self, model: nn.Module) -> dict:
        """Facts about the layers that the gated linears do not show (e.g. head counts); kept on each
        :class:`~finegates.gated_model.LayerGates` as ``meta``."""
        return {}

    def row_gate_pairs(self, model: nn.Module) -> tuple[tuple[str, str], ...]:
        """(a, b) slot pairs of ``model``'s layers whose outputs are used only in sums over their rows of products
        (Q and K in the attention scores, where nothing else reads Q: no rotary or relative positions): b's row gate
        is applied on a's output (``GatedLinear.row_gate_also``), which saves a pass over b's output. None by default."""
        return ()

    def gate_sides(self, slot: str, layout: str) -> tuple[bool, bool]:
        """(row gate, column gate) of ``slot`` in ``layout``."""
        if layout == "independent":
            return True, True
        return slot in self.coupled_rows, False

    # ---- which units go together
    def layer_kept(self, lg: "LayerGates", keep: KeepFn) -> tuple[torch.Tensor, int]:
        """(gated weights kept, gated weights in total) of one gated layer when each gate keeps its units
        with ``keep(gate)`` (an indicator, or a probability for the expectation; differentiable)."""
        raise NotImplementedError

    def layers_kept(self, layers: list["LayerGates"], keep: KeepFn) -> tuple[torch.Tensor, int]:
        """:meth:`layer_kept` summed over ``layers``. A family may compute it in fewer ops (the penalty runs every
        step, and on a GPU a step is bound by the ops it launches)."""
        kept, total = 0.0, 0
        for lg in layers:
            k, t = self.layer_kept(lg, keep)
            kept = kept + k
            total += t
        return kept, total

    # ---- compaction (the recovery phase trains only the units that are pinned open)
    def compact(self, model: nn.Module, layers: list["LayerGates"]) -> bool:
        """Make every gated layer compute only its pinned-open units, exactly (``GatedLinear.compact_``),
        and adapt the modules around them. Needs every gate pinned. False: this family does not compact."""
        return False

    def uncompact(self, model: nn.Module, layers: list["LayerGates"]) -> None:
        """Undo :meth:`compact`: full widths again."""
        for lg in layers:
            for _, gl in lg.items():
                gl.compact_()

    # ---- export
    def build_compressed(self, model: nn.Module, align: int, same_head_dim: bool) -> tuple[nn.Module, "ExportStats"]:
        raise NotImplementedError

    def load_exported(self, model: nn.Module, exported: nn.Module) -> None:
        """Copy the weights of ``exported``, a compressed checkpoint that removed nothing (a dense teacher's
        export), into ``model``, the plain Hugging Face model of the same shape (``--teacher-init``)."""
        raise NotImplementedError

    def compressed_classes(self) -> tuple[type, type]:
        """(config class, model class) of the compressed modeling file."""
        raise NotImplementedError


@torch.no_grad()
def copy_checked(copies: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """``(name, destination, source)`` copies for :meth:`Family.load_exported`: every shape is checked before the
    first copy, so a mismatch changes nothing. The error names the first tensor that differs."""
    for name, dst, src in copies:
        if dst.shape != src.shape:
            raise ValueError(f"{name} is {tuple(src.shape)} in the exported model and {tuple(dst.shape)} in the "
                             "model: only an export that removed nothing can be loaded back")
    for _, dst, src in copies:
        dst.copy_(src.to(dst.dtype))


FAMILIES: dict[str, Family] = {}  # family name -> family
_BY_MODEL_TYPE: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    fam = cls()
    FAMILIES[fam.name] = fam
    for mt in (*fam.model_types, fam.compressed_model_type):
        _BY_MODEL_TYPE[mt] = fam
    return cls


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(mt for fam in FAMILIES.values() for mt in fam.model_types))


def get_family(what: object) -> Family:
    """The family of a model, a config or a ``model_type`` string; :class:`UnsupportedModelError` if none."""
    if isinstance(what, str):
        mt = what
    else:
        cfg = getattr(what, "config", what)
        mt = getattr(cfg, "model_type", None) or type(what).__name__
    fam = _BY_MODEL_TYPE.get(mt)
    if fam is None:
        raise UnsupportedModelError(f"model type {mt!r} is not supported; accepted: "
                                    f"{', '.join(supported_model_types())}")
    return fam


def family_of_model_dir(path: str | Path) -> Family:
    """The family of a local Hugging Face model directory, from its config.json alone (nothing loaded)."""
    import json

    try:
        mt = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {str(path)!r}: cannot load its config ({type(e).__name__}); accepted: a Hugging Face "
                          "model directory or hub id") from e
    return get_family(str(mt))


# the families (each registers itself)
from finegates.arch import bert as _bert  # noqa: E402,F401
from finegates.arch import llama as _llama  # noqa: E402,F401

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "family_of_model_dir", "get_family", "register",
           "supported_model_types"]

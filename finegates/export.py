"""Export a trained gated model as a physically smaller Hugging Face checkpoint.

The model's family (:mod:`finegates.arch`) does the pruning and names the compressed modeling file; this
module dispatches, saves and loads. For BERT/RoBERTa (finegates/arch/bert.py; Llama: finegates/arch/llama.py),
per layer (W' = folded eval weights, see :meth:`GatedLinear.folded`):

* FFN neuron j is kept iff up-row j and down-column j are both non-zero in W' (GELU(0) = 0).
* Q/K dimension j of head h is kept iff Q-row j and K-row j are non-zero (q_j k_j = 0 otherwise).
* V/O dimension j of head h is kept iff V-row j and O-column j are non-zero.
* Head h is dropped when it keeps no V/O dimension (it then adds exactly nothing).
* Kept heads are zero-padded to the layer's widest head (exact), so every layer runs one batched
  attention. Residual-side gates stay folded into W' (the hidden size is shared by all layers).

Hardware-friendly layout (``align``, default 8): every kept width (the per-head Q/K and V/O dims, the
FFN width) is rounded up to a multiple of ``align`` (never above the original model's width), and with
``same_head_dim`` (default: on whenever ``align > 1``) Q/K and V/O share one head dim per layer, which
torch's fused flash-attention kernels (CUDA and CPU) require. All padding is exact: padded Q/K dims have
zero Q and K rows (score += 0), padded V dims zero V rows and zero O columns, padded FFN neurons zero
up rows, zero up bias and zero down columns (act(0) = 0). ``align=1, same_head_dim=False`` is the
exact minimal layout.

The checkpoint holds config.json, model.safetensors (fp32, bf16 or fp16: ``save_compressed(dtype=...)``),
the tokenizer and the family's modeling file (``modeling_finegates.py``, ``modeling_finegates_llama.py``);
no pickle. Load it with :func:`load_compressed` or with
transformers and ``trust_remote_code=True``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finegates.arch import UnsupportedModelError, get_family
from finegates.gated_model import trainable_head_parameters
from finegates.modeling_finegates import FineGatesConfig, FineGatesForSequenceClassification  # noqa: F401
from finegates.pruning import DEFAULT_ALIGN, ExportStats, aligned_width, check_align

log = logging.getLogger(__name__)

MODELING_FILE = Path(__file__).with_name("modeling_finegates.py")  # BERT/RoBERTa; each family names its own
# checkpoint dtypes: short name -> torch dtype (the long names and torch dtypes are accepted too)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_SAVED_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointError(ValueError):
    """An exported checkpoint that cannot be loaded (missing or corrupt file). One-line message."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Checkpoint dtype from 'fp32' / 'bf16' / 'fp16' (or 'float32', 'bfloat16', 'float16', or a torch dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in _SAVED_NAME:
        return dtype
    if isinstance(dtype, str):
        key = _DTYPE_NAMES.get(dtype.lower(), dtype.lower())
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"dtype={dtype!r} is not valid; accepted: 'fp32', 'bf16', 'fp16' "
                     "(or 'float32', 'bfloat16', 'float16', torch.float32, torch.bfloat16, torch.float16)")


@torch.no_grad()
def build_compressed(model: nn.Module, align: int = DEFAULT_ALIGN, same_head_dim: bool | None = None
                     ) -> tuple[nn.Module, ExportStats]:
    """Build the smaller fp32 model in memory from a gated model (eval gates are used), a plain one (then
    nothing is removed: this is also how the baselines export), or an exported FineGates model (re-export,
    e.g. with another ``align``; the stats then count against the original model, whose FFN width the
    checkpoint records as ``source_intermediate_size``). The model's family (:mod:`finegates.arch`) does
    the work and chooses the compressed class (BERT/RoBERTa: :class:`FineGatesForSequenceClassification`).

    ``align``: every kept width is rounded up to a multiple of it with exact zero padding (never above the
    original model's width); 1 = exact minimal widths. ``same_head_dim``: Q/K and V/O share one head dim per layer
    (needed by the fused flash-attention kernels); ``None`` = ``align > 1``.
    """
    align = check_align(align)
    if same_head_dim is None:
        same_head_dim = align > 1
    return get_family(model).build_compressed(model, align, same_head_dim)


def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer=None,
                    extra: dict | None = None, dtype: str | torch.dtype = "fp32") -> Path:
    """Write the checkpoint atomically: into a temp dir beside ``path``, then rename over it.

    ``dtype`` ('fp32', 'bf16' or 'fp16') is the dtype of the floating tensors in model.safetensors and is
    recorded in config.json, so both loaders build the model in it (a GPU server loads half precision
    directly). The in-memory ``model`` is not changed.
    """
    dt = resolve_dtype(dtype)
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fam = get_family(model)
        mod = fam.modeling_file.stem
        cfg = model.config.to_dict()
        cfg["auto_map"] = {
            "AutoConfig": f"{mod}.{fam.config_class_name}",
            "AutoModelForSequenceClassification": f"{mod}.{fam.model_class_name}",
        }
        cfg["architectures"] = [fam.model_class_name]
        cfg["dtype"] = cfg["torch_dtype"] = _SAVED_NAME[dt]  # transformers >= 4.56 reads dtype, older torch_dtype
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        state = {k: (v.detach().to(dt) if v.is_floating_point() else v.detach()).cpu().contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy2(fam.modeling_file, tmp / fam.modeling_file.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra:
            (tmp / "finegates.json").write_text(json.dumps(extra, indent=2, sort_keys=True, default=str))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_compressed(path: str | os.PathLike, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Load an exported checkpoint with the package's own modeling code (no remote code needed).

    ``dtype``: None = the dtype the checkpoint was saved in (fp32 for checkpoints that do not say), or
    'fp32' / 'bf16' / 'fp16' to convert while loading (e.g. a bf16 checkpoint in fp32 on a CPU).
    """
    want = None if dtype is None else resolve_dtype(dtype)
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{str(path)!r} is not a FineGates checkpoint (needs config.json and model.safetensors)")
    try:
        mt = json.loads((path / "config.json").read_text()).get("model_type")
        try:
            config_cls, model_cls = get_family(str(mt)).compressed_classes()
        except UnsupportedModelError:
            raise CheckpointError(f"{str(path)!r} is not a FineGates checkpoint (model_type {mt!r})") from None
        config = config_cls.from_json_file(str(path / "config.json"))
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dt = want or resolve_dtype(str(saved).replace("torch.", ""))
        model = model_cls(config).to(dt)
        state = load_file(str(path / "model.safetensors"))
        model.load_state_dict(state, strict=True)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong shapes, bad JSON
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"corrupt checkpoint {str(path)!r}: {type(e).__name__}: {msg[:200]}") from e
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with an exported checkpoint. It is the base model's own (a standard class), so no
    remote code is run and nothing is asked: without ``trust_remote_code=False`` and a neutral config,
    transformers reads the checkpoint's ``auto_map`` and prompts on a terminal whether to run its modeling code."""
    from transformers import AutoTokenizer, PretrainedConfig

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, config=PretrainedConfig())


def export_gated_model(model: nn.Module, path: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                       align: int = DEFAULT_ALIGN, dtype: str | torch.dtype = "fp32"
                       ) -> tuple[Path, ExportStats]:
    resolve_dtype(dtype)  # a bad dtype fails before the export work
    compressed, stats = build_compressed(model, align=align)
    info = {"gated_params_before": stats.gated_params_before, "gated_params_after": stats.gated_params_after,
            "sparsity": stats.sparsity, "sparsity_minimal": stats.sparsity_minimal, "align": align,
            "dtype": str(resolve_dtype(dtype)).replace("torch.", ""), **(extra or {})}
    return save_compressed(compressed, path, tokenizer, info, dtype=dtype), stats


__all__ = ["DEFAULT_ALIGN", "DTYPES", "CheckpointError", "ExportStats", "aligned_width", "build_compressed",
           "check_align", "export_gated_model", "load_compressed", "load_tokenizer", "resolve_dtype",
           "save_compressed", "trainable_head_parameters"]

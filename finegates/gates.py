"""Stochastic row/column gates and the gated linear layer (FineGates, arXiv 2412.12951).

Gate math follows the official code (GitHub jsvir/FineGates):

    mu = tanh(theta)
    train: z = clamp(mu + 0.5 + eps, 0, 1),  eps ~ N(0, 0.1^2), one draw per forward
    eval:  z = clamp(mu + 0.5, 0, 1)                                    # may be fractional
    P(open) = Phi((mu + 0.5) / sigma_reg),  sigma_reg = 0.5
    closed (removable) exactly when the eval gate is 0, i.e. mu <= -0.5

Two initialisations (``init=``):

* ``edge`` (our default): theta = atanh(0.5), so mu + 0.5 = 1 exactly. The eval gate is 1 (the model
  starts as the pretrained one) and about half of the training draws fall below the clamp, so every gate
  gets a task gradient from the first step.
* ``saturated`` (the official code): theta ~ N(1, 0.1^2), mu + 0.5 ~ 1.26, above the clamp: a gate sees
  a task gradient only when the noise takes it below 1 (about 1% of draws), so before a penalty pulls it
  down it trains on almost nothing.

A gate can be *pinned* (:meth:`Gate.pin`): units closed at that moment stay exactly closed, the others
can no longer close (:meth:`Gate.keep_open_` after each optimiser step). That is the recovery phase: the
kept weights go on training while the exported structure is fixed.

A :class:`GatedLinear` computes ``y = z_r * ((W + s B A)(z_c * x) + b)`` for a frozen ``W`` (m x n). Once its
closed units are pinned it can compute only the open ones (:meth:`GatedLinear.compact_`): the recovery phase
then multiplies matrices of the pruned model's sizes.

A model holds a few dozen gates. Evaluated one by one, each adds its own chain of small element-wise ops
(tanh, noise, clamp, cast) to every step, and on a GPU a step of a small model is bound by how many ops it
launches. :func:`gate_values` and :func:`p_open_all` evaluate all of them in one chain instead (same
law, one random draw for all); ``finegates.gated_model`` does that once per model forward, and a gate
returns its slice of that evaluation while it is set (:attr:`Gate.batched`), cast once for all gates to
the dtype the first gated linear asks for (:meth:`Gate.value`): under autocast, bf16 or fp16.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NOISE_STD = 0.1
SIGMA_REG = 0.5
INIT_MEAN = 1.0  # saturated (official) init: theta ~ N(1, 0.1^2)
INIT_STD = 0.1
GATE_INITS = ("edge", "saturated")
EDGE_THETA = math.atanh(0.5) + 1e-5  # mu + 0.5 = 1 (rounding kept on the open side): at the edge of the clamp
PINNED_OPEN_MIN = 0.05  # a pinned open gate keeps an eval value of at least this


class Gate(nn.Module):
    """A vector of ``size`` stochastic gates in [0, 1]."""

    def __init__(self, size: int, init: str = "edge", noise_std: float = NOISE_STD,
                 sigma_reg: float = SIGMA_REG) -> None:
        super().__init__()
        if init == "edge":
            theta = torch.full((size,), EDGE_THETA)
        elif init == "saturated":
            theta = torch.randn(size) * INIT_STD + INIT_MEAN
        else:
            raise ValueError(f"gate init {init!r} is invalid; accepted: {', '.join(GATE_INITS)}")
        self.theta = nn.Parameter(theta)
        self.noise_std = noise_std
        self.sigma_reg = sigma_reg
        self.register_buffer("pinned_closed", torch.zeros(size, dtype=torch.bool), persistent=False)
        # pinned: the least theta each unit may have after a step (-inf where pinned closed); made by pin()
        self.register_buffer("open_floor", None, persistent=False)
        self.pinned = False
        self.batched: tuple[Batched, int] | None = None  # (a gate_values evaluation, this gate's index), while set
        # while its linear is compacted (GatedLinear.compact_): the units it computes; forward and value return
        # these units only (eval_values, closed, p_open: always all of them). A buffer: .to() moves it
        self.register_buffer("index", None, persistent=False)

    @property
    def width(self) -> int:
        """How many values :meth:`forward` returns."""
        return self.theta.numel() if self.index is None else self.index.numel()

    @property
    def mu(self) -> torch.Tensor:
        return torch.tanh(self.theta)

    def value(self, dtype: torch.dtype) -> torch.Tensor:
        """``self()`` in ``dtype``; from a batched evaluation, all gates are cast in one op."""
        if self.batched is not None:
            values, i = self.batched
            return values.get(i, dtype)
        return self().to(dtype)

    def forward(self) -> torch.Tensor:  # (size,)
        if self.batched is not None:
            values, i = self.batched
            return values.get(i)
        mu = self.mu
        if self.training:
            mu = mu + self.noise_std * torch.randn_like(mu)
        z = torch.clamp(mu + 0.5, 0.0, 1.0)
        z = z.masked_fill(self.pinned_closed, 0.0) if self.pinned else z
        return z if self.index is None else z[self.index]

    @torch.no_grad()
    def eval_values(self) -> torch.Tensor:
        """Deterministic eval gates (what export folds into the weights)."""
        z = torch.clamp(self.mu + 0.5, 0.0, 1.0)
        return z.masked_fill(self.pinned_closed, 0.0) if self.pinned else z

    @torch.no_grad()
    def pin(self) -> None:
        """Fix the structure: closed units stay closed (exactly 0, no gradient), open ones stay open."""
        self.pinned_closed.copy_(self.eval_values() <= 0.0)
        self.open_floor = torch.full_like(self.theta, math.atanh(PINNED_OPEN_MIN - 0.5)).masked_fill_(
            self.pinned_closed, -math.inf)
        self.pinned = True
        self.keep_open_()

    @torch.no_grad()
    def keep_open_(self) -> None:
        """After an optimiser step of a pinned gate: open units keep an eval value >= PINNED_OPEN_MIN (closed ones
        are left as they are): :func:`keep_open_all_` of this gate."""
        keep_open_all_([self])

    def p_open(self) -> torch.Tensor:
        """P(gate open) = Phi((mu + 0.5) / sigma_reg); differentiable in theta."""
        return 0.5 * (1.0 + torch.erf((self.mu + 0.5) / (self.sigma_reg * math.sqrt(2.0))))

    @torch.no_grad()
    def closed(self) -> torch.Tensor:
        return self.eval_values() <= 0.0

    def extra_repr(self) -> str:
        return f"size={self.theta.numel()}"


@torch.no_grad()
def keep_open_all_(gates: Sequence[Gate]) -> None:
    """:meth:`Gate.keep_open_` for every pinned gate of ``gates`` in one multi-tensor op: a recovery step used to run
    three ops a gate (72 on MiniLM), which a GPU step, bound by the kernels it launches, pays for each."""
    pinned = [g for g in gates if g.pinned]
    if pinned:
        torch._foreach_maximum_([g.theta for g in pinned], [g.open_floor for g in pinned])


def _uniform(gates: Sequence[Gate]) -> bool:
    g0 = gates[0]
    return all(g.training == g0.training and g.noise_std == g0.noise_std and g.sigma_reg == g0.sigma_reg
               and g.theta.device == g0.theta.device for g in gates)


class Batched:
    """Tensors that one forward uses, as one batch: a slice (a view) per item, made in one chain of ops for all
    of them and cast to a dtype once for all of them, on the first request for that dtype.

    Two sources. ``Batched(tensors, shapes, gather)``: parameters of several gated linears (their biases, or
    their LoRA factors), concatenated on the first request that needs it, gathered (``gather``: the kept units
    of a compacted model, in the concatenation) and cast; where there is nothing to do (no gather, an item's own
    dtype) the item is returned as it is, with no op. :meth:`of_flat`: values already computed as one tensor
    (every gate's value, :func:`gate_values`). On a GPU a step of a small model is bound by the ops it launches:
    under autocast this replaces a cast per tensor, and compacted an index per tensor."""

    def __init__(self, tensors: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]],
                 gather: torch.Tensor | None = None) -> None:
        self.tensors, self.shapes, self.gather = list(tensors), [tuple(s) for s in shapes], gather
        self.flat: torch.Tensor | None = None  # every item, concatenated (and gathered), once made
        self._by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}

    @classmethod
    def of_flat(cls, flat: torch.Tensor, sizes: Sequence[int]) -> "Batched":
        """Items already concatenated in ``flat`` (1-d), of these sizes."""
        b = cls([], [(n,) for n in sizes])
        b.flat = flat
        b._by_dtype[flat.dtype] = list(flat.split(list(sizes)))
        return b

    def __len__(self) -> int:
        return len(self.shapes)

    def get(self, i: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Item ``i`` in ``dtype`` (default: its own)."""
        if self.tensors:
            t = self.tensors[i]
            dtype = dtype or t.dtype
            if self.gather is None and t.dtype == dtype:
                return t
            if self.flat is None:
                ts = self.tensors
                if any(x.device != ts[0].device for x in ts):  # a model spread over devices: one by one (no gather
                    return t.to(dtype)                          # then: gated_model.compact refuses such a model)
                same = all(x.dtype == ts[0].dtype for x in ts)
                flat = torch.cat([x.reshape(-1) if same else x.reshape(-1).to(dtype) for x in ts])
                self.flat = flat if self.gather is None else flat[self.gather]
        dtype = dtype or self.flat.dtype
        parts = self._by_dtype.get(dtype)
        if parts is None:
            parts = self._by_dtype[dtype] = [p.view(shape) for p, shape in zip(
                self.flat.to(dtype).split([math.prod(s) for s in self.shapes]), self.shapes)]
        return parts[i]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of ``x`` runs in: autocast's where it is on for ``x``'s device (autocast leaves
    float64 alone), else ``x``'s."""
    dev = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(dev):
        return x.dtype
    return torch.get_autocast_dtype(dev)


def compact_gather(gates: Sequence[Gate]) -> torch.Tensor | None:
    """Indices into the concatenated values of ``gates`` of the units they compute (:attr:`Gate.index`):
    one gather for all compacted gates. None when no gate is compacted."""
    if all(g.index is None for g in gates):
        return None
    parts, off = [], 0
    for g in gates:
        n = g.theta.numel()
        parts.append((g.index if g.index is not None else torch.arange(n, device=g.theta.device)) + off)
        off += n
    return torch.cat(parts)


def gate_values(gates: Sequence[Gate], gather: torch.Tensor | None = None) -> Batched:
    """What each gate's :meth:`Gate.forward` returns, computed in one chain of ops over all the gates (one
    noise draw for all of them while training). Gates that differ in mode, noise, sigma or device are
    evaluated one by one (and concatenated). Compacted gates are gathered in one op (``gather``: their
    :func:`compact_gather`, made here when not given)."""
    sizes = [g.width for g in gates]
    if not gates or not _uniform(gates):
        return Batched.of_flat(torch.cat([g() for g in gates]) if gates else torch.zeros(0), sizes)
    g0 = gates[0]
    mu = torch.tanh(torch.cat([g.theta for g in gates]))
    if g0.training:
        mu = mu + torch.randn_like(mu).mul_(g0.noise_std)
    z = torch.clamp(mu + 0.5, 0.0, 1.0)
    if any(g.pinned for g in gates):
        z = z.masked_fill(torch.cat([g.pinned_closed if g.pinned else torch.zeros_like(g.pinned_closed)
                                     for g in gates]), 0.0)
    if gather is None:
        gather = compact_gather(gates)
    return Batched.of_flat(z if gather is None else z[gather], sizes)


def p_open_all(gates: Sequence[Gate]) -> list[torch.Tensor]:
    """Every gate's :meth:`Gate.p_open`, computed in one chain of ops over all the gates."""
    if not gates:
        return []
    if not _uniform(gates):
        return [g.p_open() for g in gates]
    mu = torch.tanh(torch.cat([g.theta for g in gates]))
    p = 0.5 * (1.0 + torch.erf((mu + 0.5) / (gates[0].sigma_reg * math.sqrt(2.0))))
    return list(p.split([g.theta.numel() for g in gates]))


class GatedLinear(nn.Module):
    """``Diag(z_r) (W + s B A) Diag(z_c)`` around a frozen :class:`torch.nn.Linear`.

    ``row``/``col`` switch the row (output) and column (input) gates; ``rank`` > 0 adds LoRA inside the
    gates (A: r x n Kaiming-uniform, B: m x r zeros, scale s = alpha / r). The bias stays where the
    base layer has it; the row gate is applied after it, so a closed row outputs exactly 0 (in the model: a linear
    whose row gate another one applies, :meth:`pair_row_gate`, returns its ungated output, and the product of the two
    is 0 there).
    """

    def __init__(self, base: nn.Linear, *, row: bool = True, col: bool = True, rank: int = 0,
                 lora_alpha: float | None = None, train_bias: bool = False, gate_init: str = "edge") -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)  # (m, n)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(),
                                                                  requires_grad=train_bias)
        self.row_gate = Gate(self.out_features, gate_init) if row else None
        self.col_gate = Gate(self.in_features, gate_init) if col else None
        self.rank = rank
        if rank > 0:
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
            self.scaling = (lora_alpha if lora_alpha is not None else rank) / rank
        else:
            self.lora_A = self.lora_B = None
            self.scaling = 0.0
        # compacted (:meth:`compact_`): only these output rows / input columns are computed, from this copy of
        # the frozen weight's kept block. Buffers, so that .to() / .half() move them; not in the state dict
        self.register_buffer("out_index", None, persistent=False)
        self.register_buffer("in_index", None, persistent=False)
        self.register_buffer("compact_weight", None, persistent=False)
        # during a forward of the gated model (finegates.gated_model): this linear's bias and LoRA factors, as
        # (a Batched evaluation of all the model's, index); the frozen weight in autocast's dtype, once made
        self.batched_bias: tuple[Batched, int] | None = None
        self.batched_lora: tuple[Batched, int] | None = None
        self.input_casts: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # one slot, shared
        # a row gate applied on another linear's output (set by gated_model.apply_gates, Family.row_gate_pairs): where
        # two linears' outputs meet only in a product over their rows (Q and K in the attention scores, q_j z_j k_j z'_j
        # per dimension j), the second's gate multiplies the first's output with the first's own (``row_gate_also``) and
        # the second's output is not scaled (``row_gate_elsewhere``): one pass over an activation less, forward and
        # backward; the model computes the same function. Alone, such a second linear returns its ungated output.
        self._row_gate_also: tuple[Gate, ...] = ()  # a tuple, so that the other linear's gate is not a submodule here
        self.row_gate_elsewhere = False
        self._weight_cast: tuple[tuple, torch.Tensor] | None = None
        self._register_load_state_dict_pre_hook(self.drop_weight_cast)

    @property
    def row_gate_also(self) -> Gate | None:
        """Another linear's row gate that this one applies on its output beside its own (see ``row_gate_elsewhere``)."""
        return self._row_gate_also[0] if self._row_gate_also else None

    def pair_row_gate(self, other: "GatedLinear") -> None:
        """Apply ``other``'s row gate on this linear's output beside its own, and none on ``other``'s (not an attribute
        assignment: nn.Module would register the other's gate as a submodule here). Undone by
        ``gated_model.separate_row_gates`` (:meth:`unpair_row_gate` on each side)."""
        self._row_gate_also, other.row_gate_elsewhere = (other.row_gate,), True

    def unpair_row_gate(self) -> None:
        """Undo :meth:`pair_row_gate` on this side: only this linear's own row gate, on its own output."""
        self._row_gate_also, self.row_gate_elsewhere = (), False

    def gates(self) -> list[Gate]:
        return [g for g in (self.row_gate, self.col_gate) if g is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., n) -> (..., m); compacted: (..., n') -> (..., m')
        dtype = compute_dtype(x)
        if self.col_gate is not None:  # compacted, the gates return their kept units (Gate.index)
            x = x * self.col_gate.value(x.dtype)
            x = x if x.dtype == dtype else x.to(dtype)  # autocast: cast once, for the main and the LoRA product
        elif x.dtype != dtype:  # autocast: cast the input once, for the LoRA path and for the other linears it feeds
            x = self._cast_input(x, dtype)
        y = F.linear(x, self._frozen_weight(dtype), self._bias(dtype))
        if self.lora_A is not None:
            lora_a, lora_b = self._lora(dtype)
            h = F.linear(x, lora_a)  # (..., r); then y + s h B^T in one op
            n = math.prod(y.shape[:-1])
            y = torch.addmm(y.reshape(n, y.shape[-1]), h.reshape(n, h.shape[-1]), lora_b.t(),
                            alpha=self.scaling).view(y.shape)
        if self.row_gate is not None and not self.row_gate_elsewhere:
            z = self.row_gate.value(y.dtype)
            if self.row_gate_also is not None:
                z = z * self.row_gate_also.value(y.dtype)  # a vector: the pass saved is over the other's output
            y = y * z
        return y

    def _cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` in ``dtype``; during a forward of the gated model an input is cast once for the linears it feeds
        one after another (Q, K and V read the same hidden states), where autocast would cast it for each. Only
        the last input is held (``input_casts``, one slot shared by the model's linears), so that no activation is
        kept longer than the linears that read it."""
        last = self.input_casts
        if last is None:
            return x.to(dtype)
        if last[0] is None or last[0][0] is not x or last[0][1].dtype != dtype:
            last[0] = (x, x.to(dtype))
        return last[0][1]

    def _frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight (its kept block, compacted); under autocast a copy in autocast's dtype, made once and
        kept while the weight is unchanged, where autocast would cast it again in every forward."""
        w = self.weight if self.compact_weight is None else self.compact_weight
        if w.dtype == dtype or not torch.is_autocast_enabled(w.device.type):
            return w
        # made again after .to(), .half(), load_state_dict (a pre-hook, set in __init__), compact_, or an in-place
        # write to the weight; a write through ``weight.data`` is not seen: call drop_weight_cast() after one
        key = (dtype, w is self.weight, w.data_ptr(), w._version)
        if self._weight_cast is None or self._weight_cast[0] != key:
            with torch.no_grad(), torch.inference_mode(False):  # a normal tensor, even if made under inference mode
                self._weight_cast = (key, w.to(dtype))
        return self._weight_cast[1]

    def drop_weight_cast(self, *args, **kwargs) -> None:
        """Forget the autocast copy of the frozen weight (it is made again on the next forward under autocast)."""
        self._weight_cast = None

    def __getstate__(self):  # deepcopy / pickle: not the copy
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_weight_cast": None}

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if self.batched_bias is not None:  # the model's forward: all gated biases cast / gathered at once
            values, i = self.batched_bias
            return values.get(i, dtype)
        rows = self.out_index
        return self.bias if self.bias is None or rows is None else self.bias[rows]

    def _lora(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batched_lora is not None:  # the model's forward: every linear's factors cast / gathered at once
            values, i = self.batched_lora
            return values.get(i, dtype), values.get(i + 1, dtype)
        rows, cols = self.out_index, self.in_index
        lora_a = self.lora_A if cols is None else self.lora_A[:, cols]
        lora_b = self.lora_B if rows is None else self.lora_B[rows]
        return lora_a.to(dtype), lora_b.to(dtype)

    @property
    def out_width(self) -> int:
        """How many outputs :meth:`forward` computes (fewer once compacted)."""
        return self.out_features if self.out_index is None else self.out_index.numel()

    @property
    def in_width(self) -> int:
        return self.in_features if self.in_index is None else self.in_index.numel()

    @torch.no_grad()
    def compact_(self, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> None:
        """Compute only the output rows ``out_index`` from the input columns ``in_index`` (the input then has
        ``len(in_index)`` features); ``None`` keeps all. Exact where the rows and columns left out are closed
        for good (pinned): their outputs are exactly 0, and nothing that trains gets a gradient through them.
        The parameters keep their full shapes (export and checkpoints do not see this); ``compact_()`` (no
        arguments) undoes it. The frozen weight's kept block is copied once, here (held beside the full weight)."""
        self.out_index, self.in_index = out_index, in_index
        self._weight_cast = None
        if self.row_gate is not None:
            self.row_gate.index = out_index
        if self.col_gate is not None:
            self.col_gate.index = in_index
        if out_index is None and in_index is None:
            self.compact_weight = None
            return
        w = self.weight if out_index is None else self.weight.index_select(0, out_index)
        self.compact_weight = (w if in_index is None else w.index_select(1, in_index)).contiguous()

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the autocast copy of the weight is made again
        self._weight_cast = None
        return super()._apply(fn, recurse)

    @property
    def compacted(self) -> bool:
        return self.compact_weight is not None

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval-mode weight and bias with gates and LoRA folded in: ``y = W' x + b'`` exactly."""
        w = self.weight.float().clone()  # (m, n)
        if self.lora_A is not None:
            w += self.scaling * (self.lora_B.float() @ self.lora_A.float())
        b = None if self.bias is None else self.bias.float().clone()
        if self.col_gate is not None:
            w *= self.col_gate.eval_values().float()[None, :]
        if self.row_gate is not None:
            zr = self.row_gate.eval_values().float()
            w *= zr[:, None]
            if b is not None:
                b *= zr
        return w, b

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, row={self.row_gate is not None}, "
                f"col={self.col_gate is not None}, rank={self.rank}")

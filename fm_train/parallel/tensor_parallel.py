"""Megatron-style tensor parallelism applied to a pure model from outside, by module name.

What is split and how is a family's :class:`~fm_train.parallel.tp_plan.TPPlan`: column-parallel
linears split their outputs, row-parallel ones their inputs (output all-reduced), a vocab-parallel
embedding its rows, and a head column-parallel over the vocabulary feeds its local logits to
:func:`~fm_train.parallel.tp_collectives.vocab_parallel_cross_entropy`, so full logits are never gathered
for the loss. The group and its collectives are :mod:`fm_train.parallel.tp_collectives`.

Each attention/MLP region copies its input into the tp region once (a forward pre-hook), so backward
all-reduces one activation gradient per region, not one per linear; with ``TPGroup.overlap`` the region's
entry computes the region's weight gradients while that collective is in flight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fm_train.model.loss import LMHead, linear_cross_entropy
from fm_train.parallel.tp_collectives import (
    SINGLE,
    TPGroup,
    _all_reduce,
    _gather_sequence,
    _start_gather_sequence,
    _start_scatter_sequence_sum,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    tensor_sequence_split,
    tp_combine,
    vocab_parallel_cross_entropy,
)
from fm_train.parallel.tp_plan import TPPlan

# Re-exported: the layers' users import the group and the collectives from here too.
__all__ = ["SINGLE", "ColumnParallelLinear", "RowParallelLinear", "TPGroup", "VocabParallelEmbedding",
           "VocabParallelHead", "apply_tensor_parallel", "copy_to_tp", "gather_from_tp", "mark_tensor_parallel",
           "reduce_from_tp", "retie", "shard", "tensor_sequence_split", "tied_parameters", "tp_combine",
           "tp_split_dims", "vocab_parallel_cross_entropy", "weight_grads"]

# ---- layers ----------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """``y_local = x W_local^T + b_local`` with ``W`` split along its output dim (dim 0)."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, bias: bool = False,
                 copy_input: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp, self.copy_input = tp, copy_input
        local = tp.split(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(local, device=device)) if bias else None
        #: Set by an overlapped region's entry for the length of its forward: where this linear leaves its
        #: output gradient (:class:`_RegionGrads` and this linear's place in it).
        self.deferred: tuple[_RegionGrads, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.tp, fresh_grad=True)
        # Deferred only when applied to the region's input itself: the entry computes the weight gradient
        # from that input (a linear applied to anything else keeps its own backward).
        if self.deferred is not None and torch.is_grad_enabled() and x is self.deferred[0].entered:
            grads, index = self.deferred
            grads.claim(index)
            bias = None if self.bias is None else self.bias.detach()
            needs_grad = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
            return _DeferredColumnLinear.apply(x, self.weight.detach(), bias, grads, index, needs_grad)
        return F.linear(x, self.weight, self.bias)


class VocabParallelHead(ColumnParallelLinear):
    """The output head split over the vocabulary (the twin of :class:`~fm_train.model.loss.LMHead`):
    ``forward(x)`` gives this rank's columns of the logits, ``forward(x, labels)`` each token's loss over
    the whole real vocabulary (:func:`~fm_train.model.loss.linear_cross_entropy` over this rank's rows,
    combined over tp), the same on every tp rank; no rank holds its part of the logits whole."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, real_vocab: int, bias: bool = False,
                 copy_input: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, tp, bias=bias, copy_input=copy_input, device=device)
        self.real_vocab = real_vocab

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,  # type: ignore[override]
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: this rank's columns of a bias another module holds, in place of the head's own (as
        :class:`~fm_train.model.loss.LMHead`)."""
        bias = self.bias if bias is None else bias
        if self.copy_input:
            x = copy_to_tp(x, self.tp, fresh_grad=True)  # backward sums the ranks' parts of the input's gradient
        if labels is None:
            return F.linear(x, self.weight, bias)
        start = self.tp.rank * self.weight.shape[0]
        losses = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, labels.reshape(-1), bias=bias,
                                      vocab_start=start, real_vocab=self.real_vocab - start,
                                      combine=tp_combine(self.tp))
        return losses.view(labels.shape)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local W_local^T) + b`` with ``W`` split along its input dim (dim 1)."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, *, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, tp.split(in_features, "input features"), device=device))
        # The bias is replicated and added once, after the reduction.
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split; each rank looks up the ids it owns."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp = tp
        local = tp.split(num_embeddings, "vocab_size")
        self.vocab_start = tp.rank * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        foreign = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(foreign, 0), self.weight)
        out = out.masked_fill(foreign.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.tp)


# ---- a region's entry that overlaps its input gradient's collective with the weight gradients ---------
class _RegionGrads:
    """One forward of an overlapped region: the output gradient each of its column linears' backward leaves
    for the entry (by the linear's place among the entry's linears) and, under the regathered sequence split,
    the region's input kept as this rank's chunk (:class:`_Regathered`), whose all-gather the first of those
    backwards starts."""

    def __init__(self, count: int, regathered: "_Regathered | None") -> None:
        self.claimed = [False] * count
        self.left: list[torch.Tensor | None] = [None] * count
        self.regathered = regathered
        #: The entry's output: the tensor a linear must be applied to for its weight gradient to be deferred.
        self.entered: torch.Tensor | None = None

    def claim(self, index: int) -> None:
        if self.claimed[index]:
            raise RuntimeError("tensor parallelism: a column linear of an overlapped region ran twice in one forward"
                               " of the region; its weight gradient would be computed once (set parallel.tp_overlap:"
                               " false for this model)")
        self.claimed[index] = True

    def leave(self, index: int, grad: torch.Tensor | None) -> None:
        """``grad``: None when the linear's weight needs no gradient (frozen)."""
        if self.regathered is not None:  # the entry needs the whole input soon: gather it behind the matmuls
            self.regathered.start()
        self.left[index] = grad

    def take(self, index: int) -> torch.Tensor | None:
        left, self.left[index] = self.left[index], None
        return left


class _DeferredColumnLinear(torch.autograd.Function):
    """``F.linear`` (weight and bias passed detached) whose backward gives the input gradient only and leaves
    its output gradient to the region's entry, which holds the input and computes the weight and bias
    gradients; the linear itself keeps only its weight for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                grads: _RegionGrads, index: int, needs_grad: bool) -> torch.Tensor:
        ctx.grads, ctx.index, ctx.needs_grad = grads, index, needs_grad
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        ctx.grads.leave(ctx.index, grad if ctx.needs_grad else None)
        return grad.matmul(weight), None, None, None, None, None


def weight_grads(grad: torch.Tensor, x: torch.Tensor, bias: bool) -> list[torch.Tensor]:
    """A linear's weight gradient (and its bias's) from its output gradient and input, as ``F.linear``'s
    backward computes them."""
    g, inputs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    out = [g.t().mm(inputs)]
    if bias:
        out.append(g.sum(0))
    return out


class _EnterRegion(torch.autograd.Function):
    """Enter a tp region whose column linears defer their weight gradients (``TPGroup.overlap``).

    Forward as :func:`copy_to_tp` (the identity, or the sequence gathered). Backward receives the summed input
    gradient of the region's linears, starts its collective (all-reduce, or reduce-scatter of the sequence)
    without waiting, computes the linears' weight gradients meanwhile and waits only then: Megatron-Core's
    asynchronous gradient all-reduce, with the weights left as they are (q/k/v and gate/up stay separate
    parameters under their Hugging Face names). The weights are inputs of this node, so their gradients reach
    their ``AccumulateGrad`` (and DeepSpeed's reduction hooks) from here. The incoming gradient is reduced in
    place: it is the sum of the linears' fresh input gradients, which no other node holds.

    The node keeps the region's input for the weight gradients (the linears keep only their weights): the
    input itself, the gathered sequence, or under the regathered split this rank's chunk, whose all-gather
    the first linear's backward starts so that it runs behind the input-gradient matmuls (as Megatron's
    linears do).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, tp: TPGroup, grads: _RegionGrads, biased: tuple[bool, ...],  # type: ignore[override]
                *params: torch.Tensor) -> torch.Tensor:
        ctx.tp, ctx.grads, ctx.biased = tp, grads, biased
        out = _gather_sequence(x, tp) if tp.sequence_parallel else x.view_as(x)
        if grads.regathered is None:  # else the regathering region keeps this rank's chunk of ``out``
            ctx.save_for_backward(x if not tp.sequence_parallel else out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        tp: TPGroup = ctx.tp
        work = None
        if ctx.needs_input_grad[0]:  # started before the weight gradients (and before waiting for the input)
            if tp.sequence_parallel:
                summed, work = _start_scatter_sequence_sum(grad, tp, async_op=True)
            else:
                summed = grad.contiguous()
                work = dist.all_reduce(summed, group=tp.group, async_op=True)
        regathered = ctx.grads.regathered
        x = regathered.get() if regathered is not None else ctx.saved_tensors[0]
        param_grads: list[torch.Tensor | None] = []
        for index, bias in enumerate(ctx.biased):
            left = ctx.grads.take(index)
            param_grads.extend([None] * (1 + bias) if left is None else weight_grads(left, x, bias))
        param_grads = [g if need else None for g, need in zip(param_grads, ctx.needs_input_grad[4:])]
        if work is None:
            return (None, None, None, None, *param_grads)
        work.wait()
        dx = summed.transpose(0, 1).contiguous() if tp.sequence_parallel else summed
        return (dx, None, None, None, *param_grads)


def _region_entry(region: nn.Module, tp: TPGroup):
    """``enter(x, regathered)`` for ``region``: its input into the tp region, overlapped
    (:class:`_EnterRegion`) when ``tp`` says so, grad is on and the region has column linears (``regathered``:
    the input as the regathering region keeps it); and ``leave()``, which ends the forward's deferral (call
    it when the region's forward returns or fails)."""
    linears = [m for m in region.modules() if type(m) is ColumnParallelLinear and not m.copy_input]

    def enter(x: torch.Tensor, regathered: "_Regathered | None" = None) -> torch.Tensor:
        # Compiled blocks trace the synchronous path: the entry's state between forward and backward (the
        # linears' deferral, a Python object) is not something a graph holds.
        if not (tp.overlap and linears and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return copy_to_tp(x, tp)
        grads = _RegionGrads(len(linears), regathered)
        params: list[torch.Tensor] = []
        for index, linear in enumerate(linears):
            linear.deferred = (grads, index)
            params.extend([linear.weight] if linear.bias is None else [linear.weight, linear.bias])
        biased = tuple(linear.bias is not None for linear in linears)
        grads.entered = _EnterRegion.apply(x, tp, grads, biased, *params)
        return grads.entered

    def leave() -> None:
        for linear in linears:
            if linear.deferred is not None:  # the entry's output is not kept past the forward (it may be the
                linear.deferred[0].entered = None  # gathered sequence the regathering region keeps a chunk of)
            linear.deferred = None

    return enter, leave


# ---- the plan ----------------------------------------------------------------------------------------
def tp_split_dims(module: nn.Module, plan: TPPlan) -> dict[str, int | None]:
    """Parameter name -> tp split dim (0, 1 or None) for every state-dict entry of ``module``, tied
    duplicates included, by the module's own names (a pure model's are its Hugging Face keys)."""
    return {name: plan.split_dim_of(name) for name, _ in module.named_parameters(remove_duplicate=False)}


def mark_tensor_parallel(param: nn.Parameter, dim: int | None, tp: TPGroup) -> None:
    """Tag a parameter with its split dim (``tp_split_dim``) and, when it is a shard, with Megatron's
    ``tensor_model_parallel`` flag: DeepSpeed then counts it on every tp rank in the gradient norm,
    and a replicated parameter (a norm weight) only on tp rank 0."""
    param.tp_split_dim = dim  # type: ignore[attr-defined]
    param.tensor_model_parallel = dim is not None and tp.size > 1  # type: ignore[attr-defined]


def shard(full: torch.Tensor, dim: int | None, tp: TPGroup) -> torch.Tensor:
    """This rank's contiguous slice of ``full`` along ``dim`` (the whole tensor when replicated)."""
    if dim is None or tp.size == 1:
        return full
    return full.chunk(tp.size, dim=dim)[tp.rank]


def _parallel_twin(name: str, module: nn.Module, style: str, tp: TPGroup, in_region: bool) -> nn.Module:
    device = next((p.device for p in module.parameters()), None)
    if style == "vocab":
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"tensor-parallel plan: {name} should be an nn.Embedding, found {type(module).__name__}")
        return VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, tp, device=device)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"tensor-parallel plan: {name} should be an nn.Linear, found {type(module).__name__}")
    bias = module.bias is not None
    if style == "row":
        return RowParallelLinear(module.in_features, module.out_features, tp, bias=bias, device=device)
    if isinstance(module, LMHead):
        return VocabParallelHead(module.in_features, module.out_features, tp, real_vocab=module.real_vocab, bias=bias,
                                 copy_input=not in_region, device=device)
    return ColumnParallelLinear(module.in_features, module.out_features, tp, bias=bias,
                                copy_input=not in_region, device=device)


def _entering_region(module: nn.Module, tp: TPGroup) -> None:
    """Enter ``module``'s region on each forward (:func:`_region_entry`)."""
    enter, leave = _region_entry(module, tp)
    module.register_forward_pre_hook(lambda _module, args: (enter(args[0]), *args[1:]))
    module.register_forward_hook(lambda _module, _args, _output: leave(), always_call=True)


class _Regathered:
    """What a region keeps for backward in place of its gathered input: this rank's chunk, gathered again
    (once, for every saved use of it) when backward first needs it."""

    def __init__(self, local: torch.Tensor, tp: TPGroup) -> None:
        self.local, self.tp = local, tp
        self.full: torch.Tensor | None = None
        self._gathering: tuple[torch.Tensor, Any] | None = None

    def start(self) -> None:
        """Start the all-gather without waiting for it (a no-op once started)."""
        if self.full is None and self._gathering is None:
            self._gathering = _start_gather_sequence(self.local, self.tp, async_op=True)

    def get(self) -> torch.Tensor:
        if self.full is None:
            self.start()
            assert self._gathering is not None
            out, work = self._gathering
            work.wait()
            self.full, self._gathering = out.transpose(0, 1).contiguous(), None
        return self.full


def _regathering_region(module: nn.Module, tp: TPGroup) -> None:
    """Under the sequence split, enter ``module``'s region with the gathered sequence but let the tensors its
    layers save for backward keep only this rank's chunk of it (Megatron's linears do the same): the
    whole sequence is gathered again in backward. Saved-tensor hooks are active for the region's forward
    only; without them each region would keep ``seq x hidden`` whole on every tp rank."""
    state: dict[str, object] = {}
    enter, leave = _region_entry(module, tp)

    def pre(_module: nn.Module, args: tuple) -> tuple:
        local = args[0]
        keep = _Regathered(local.detach(), tp)
        full = enter(local, keep)
        if not torch.is_grad_enabled():
            return (full, *args[1:])
        storage, numel = full.untyped_storage().data_ptr(), full.numel()

        def pack(t: torch.Tensor) -> object:
            if t.numel() == numel and t.is_contiguous() and t.untyped_storage().data_ptr() == storage:
                return (keep, t.shape)
            return t

        def unpack(packed: object) -> torch.Tensor:
            if isinstance(packed, tuple):
                again, shape = packed
                return again.get().view(shape)
            return packed  # type: ignore[return-value]

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        hooks.__enter__()
        state["hooks"] = hooks
        return (full, *args[1:])

    def post(_module: nn.Module, _args: tuple, output: object) -> object:
        leave()
        hooks = state.pop("hooks", None)
        if hooks is not None:
            hooks.__exit__(None, None, None)  # type: ignore[attr-defined]
        return output

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post, always_call=True)


def _sum_grads_over_tp(module: nn.Module, tp: TPGroup, names: frozenset[str] | None = None) -> None:
    """Make the gradients of ``module``'s own parameters (those in ``names``: None, all) sum over the tp
    ranks (a hook on each)."""
    for name, param in module.named_parameters(recurse=False):
        if names is not None and name not in names:
            continue
        if param.requires_grad and not getattr(param, "tp_grad_summed", False):
            param.register_hook(lambda grad: _all_reduce(grad, tp))
            param.tp_grad_summed = True  # type: ignore[attr-defined]


def _register_summed_grads(module: nn.Module, tp: TPGroup, names: frozenset[str] | None = None) -> None:
    """Sum ``module``'s weight gradients (its own parameters in ``names``; None: all) over the tp ranks
    from its first forward on.

    The gradient hooks go on at the first forward, not now, because materialising a meta-built model
    makes new ``Parameter`` objects; the forward pre-hook that installs them then removes itself, and
    runs outside ``torch.compile`` (a compiled block sees it once, as a graph break).
    """
    @torch.compiler.disable
    def install(mod: nn.Module, _args: tuple) -> None:
        _sum_grads_over_tp(mod, tp, names)
        handle.remove()

    handle = module.register_forward_pre_hook(install)


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. embed_tokens.weight and lm_head.weight)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def retie(module: nn.Module, ties: list[list[str]], plan: TPPlan | None = None) -> None:
    """Make each group of names share the first name's parameter again (after modules were swapped);
    with ``plan``, refuse a group whose members the plan splits differently."""
    for names in ties:
        dims = {plan.split_dim_of(n) for n in names} if plan is not None else {None}
        if len(dims) != 1:
            raise ValueError(f"tied parameters {names} are split differently by the tp plan ({dims})")
        owner = module.get_parameter(names[0])
        for other in names[1:]:
            mod_name, _, attr = other.rpartition(".")
            setattr(module.get_submodule(mod_name), attr, owner)


def _shard_own_parameter(module: nn.Module, name: str, dim: int, tp: TPGroup) -> None:
    """Replace the parameter ``name`` (held by a module the plan does not swap) with its tp shard."""
    mod_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(mod_name)
    full = getattr(owner, attr)
    local = list(full.shape)
    local[dim] = tp.split(local[dim], name)
    if full.device.type == "meta":
        part = torch.empty(local, device="meta", dtype=full.dtype)
    else:
        part = shard(full, dim, tp).clone()
    setattr(owner, attr, nn.Parameter(part, requires_grad=full.requires_grad))
    mark_tensor_parallel(getattr(owner, attr), dim, tp)


@torch.no_grad()
def apply_tensor_parallel(model: nn.Module, tp: TPGroup, plan: TPPlan) -> nn.Module:
    """Split ``model`` (in place) by ``plan`` for this tp rank; returns ``model``.

    The plan's modules are swapped for their tensor-parallel twins, its own parameters for their
    shards, its regions get the hooks that move activations into the tp region (and its
    ``summed_grads`` modules the hook that sums their weights' gradients). Names stay the
    same, so state-dict keys do not change, only shapes. A module on the meta device gets meta shards
    (materialise them with :func:`fm_train.parallel.sharded_init.materialize_`); a real one gets this
    rank's slice of its weights. Tied parameters stay tied.
    """
    if tp.size == 1:
        return model
    ties = tied_parameters(model)
    targets = [(n, m, plan.style_of(n)) for n, m in model.named_modules() if n and plan.style_of(n)]
    for name, module, style in targets:
        parent_name, _, leaf = name.rpartition(".")
        twin = _parallel_twin(name, module, style, tp, in_region=plan.is_region(parent_name))
        for pname, p in module.named_parameters():
            dim = plan.split_dim_of(f"{name}.{pname}")
            if p.device.type != "meta":
                getattr(twin, pname).copy_(shard(p, dim, tp))
            mark_tensor_parallel(getattr(twin, pname), dim, tp)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, twin)
    swapped = tuple(name + "." for name, _, _ in targets)
    for name, _ in list(model.named_parameters()):
        dim = plan.own_param_dim(name)
        if dim is not None and not name.startswith(swapped):
            _shard_own_parameter(model, name, dim, tp)
    for name, module in model.named_modules():
        if plan.is_region(name):
            if tp.sequence_parallel and tp.regather:
                _regathering_region(module, tp)
            else:
                _entering_region(module, tp)
        if plan.sums_grads(name):
            _register_summed_grads(module, tp)
        elif tp.sequence_parallel:  # whole weights applied to this rank's tokens only: partial gradients
            whole = frozenset(p for p, _ in module.named_parameters(recurse=False)
                              if plan.split_dim_of(f"{name}.{p}" if name else p) is None)
            if whole:
                _register_summed_grads(module, tp, whole)
    retie(model, ties, plan)
    return model

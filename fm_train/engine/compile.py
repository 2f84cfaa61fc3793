"""``torch.compile`` of each block (the model family's block types), applied from outside the pure model (``parallel.compile``).

Blocks, not the whole model: a block is the unit that repeats, so one compiled graph serves every
block of the same shape (torch inlines module parameters as graph inputs rather than guarding on
each instance), compile time does not grow with depth, and the embedding, head and loss, where
DeepSpeed and the tensor-parallel plan put their collectives, stay eager. Inside a block the compiler
fuses RMSNorm, RoPE, SwiGLU and the residual adds around the matmuls and SDPA kernels.

``nn.Module.compile`` compiles in place: the module tree and the parameter names do not change, so
checkpoints, the manifest and the HF export never notice. It composes with activation
checkpointing (applied first, the compiled call runs the checkpointed forward) and with pipeline
stages, whose blocks are subclasses of the family's block types. Under ZeRO-3 the parameter-fetch hooks that
DeepSpeed puts on every linear layer are excluded from compilation, which splits each block into
smaller graphs: it still runs, with less to gain.
"""

from __future__ import annotations

from torch import nn

#: Set on a block this module compiled, so that compiling twice is a no-op.
_COMPILED = "_fm_train_compiled"


def compile_blocks(module: nn.Module, blocks: tuple[type, ...], backend: str = "inductor") -> int:
    """Compile every block of ``module`` (instances of ``blocks``, the family's block types) in place;
    returns how many (compiled on first call). ``backend``: torch.compile's (the CPU tests use
    ``aot_eager``, which traces the same graphs, forward and backward, without generating kernels)."""
    count = 0
    for block in module.modules():
        if isinstance(block, blocks) and not getattr(block, _COMPILED, False):
            block.compile(backend=backend)
            setattr(block, _COMPILED, True)
            count += 1
    return count

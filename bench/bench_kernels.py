"""The step's kernels on CPU: what a Llama block keeps for backward, and the peak memory of the loss.

    .venv/bin/python bench/bench_kernels.py block            # saved-for-backward bytes per block, before/after
    .venv/bin/python bench/bench_kernels.py loss             # peak RSS of head + loss at vocab 128k, before/after
    .venv/bin/python bench/bench_kernels.py norm             # RMSNorm: fp32 formula against F.rms_norm, time

``block``: one ``DecoderLayer`` of the 1.1b preset (hidden 2048, 32 heads, 4 kv heads, ffn 5632) on one
sample of ``--seq`` tokens; every tensor autograd saves is counted once (by storage) through
``torch.autograd.graph.saved_tensors_hooks``, parameters left out, and set against the planner's term
(:func:`fm_train.families.llama.shape.activation_bytes_per_layer`). "before" runs the block with the
code these kernels replaced (RMSNorm's six-op fp32 formula, RoPE through ``cat``, ``silu(g) * u`` in
autograd), patched in by this script; "after" runs the shipped modules.

``loss``: the output head and the cross-entropy of ``--seq`` tokens over a 128,256-token vocabulary at
hidden 2048, forward and backward, each path in a fresh process; the figure is the peak RSS of the
process minus its RSS once the inputs and the weight (and its gradient buffer) exist. "before" is the
logits path (``F.linear`` then :func:`causal_lm_loss`); "after" is :func:`linear_cross_entropy`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1024**2


# ---- the code the kernels replaced ("before"), verbatim -----------------------------------------------
def _before_rmsnorm_forward(self: Any, x: Any) -> Any:
    dtype = x.dtype
    h = x.float()
    h = h * __import__("torch").rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * h.to(dtype)


def _before_apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    def rotate_half(t: Any) -> Any:
        x1, x2 = t.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return x * cos + rotate_half(x) * sin


def _before_mlp_forward(self: Any, x: Any) -> Any:
    import torch.nn.functional as F

    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def use_before() -> None:
    """Patch the replaced kernels back into the Llama modules (this process only)."""
    from fm_train.families.llama import model

    model.RMSNorm.forward = _before_rmsnorm_forward
    model.apply_rope = _before_apply_rope
    model.MLP.forward = _before_mlp_forward


# ---- block ----------------------------------------------------------------------------------------------
def block_shape(seq: int, dtype: str) -> tuple[Any, Any]:
    from fm_train.families.llama.model import LlamaArgs

    args = LlamaArgs(n_layers=22, hidden=2048, n_heads=32, n_kv_heads=4, ffn_hidden=5632, vocab_size=32000,
                     max_seq_len=seq)
    cfg = SimpleNamespace(model=SimpleNamespace(hidden=2048, ffn_hidden=5632, n_heads=32, n_kv_heads=4, head_dim=None),
                          parallel=SimpleNamespace(tp=1, tp_sequence_parallel=False, activation_checkpointing=False),
                          data=SimpleNamespace(seq_len=seq), train=SimpleNamespace(micro_batch=1), precision=dtype)
    return args, cfg


def saved_bytes(seq: int, dtype_name: str) -> dict[str, float]:
    """Bytes a block saves for backward (each storage once, parameters excluded) and one step's time."""
    import torch

    from fm_train.families.llama.model import DecoderLayer, rope_tables

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    args, _ = block_shape(seq, dtype_name)
    torch.manual_seed(0)
    block = DecoderLayer(args).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    cos, sin = rope_tables(args.head_dim, seq, args.rope_theta)
    x = torch.randn(1, seq, args.hidden, dtype=dtype, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, cos, sin)
    saved = sum(seen.values())
    out.float().pow(2).mean().backward()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        block(x, cos, sin).float().pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    return {"saved": saved, "step_s": sorted(times)[1]}


def planner_bytes(seq: int, dtype_name: str) -> float:
    from fm_train.families.llama.shape import activation_bytes_per_layer

    return activation_bytes_per_layer(block_shape(seq, dtype_name)[1])


# ---- loss -----------------------------------------------------------------------------------------------
def loss_peak(impl: str, seq: int, hidden: int, vocab: int, dtype_name: str) -> dict[str, float]:
    """Peak RSS of head + loss forward and backward above the RSS with inputs and weight in place (this process)."""
    import resource

    import torch
    import torch.nn.functional as F

    from fm_train.families.llama.model import causal_lm_loss
    from fm_train.model.loss import linear_cross_entropy

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / MIB

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).to(dtype).requires_grad_()
    weight.grad = torch.empty_like(weight).fill_(0.0)  # exists (and is resident) in a training step either way
    hidden_states = torch.randn(1, seq, hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))
    base = rss_mib()
    start = time.perf_counter()
    if impl == "before":
        loss = causal_lm_loss(F.linear(hidden_states, weight), labels, vocab_size=vocab)
    else:
        per_token = linear_cross_entropy(hidden_states.reshape(-1, hidden), weight, labels.reshape(-1))
        loss = per_token.sum() / labels.numel()
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"peak_above_base_mib": peak - base, "loss": float(loss), "fwd_bwd_s": elapsed}


# ---- norm -----------------------------------------------------------------------------------------------
def norm_timing(seq: int, hidden: int) -> dict[str, Any]:
    """Forward + backward time and saved bytes of the fp32 formula against ``F.rms_norm`` (bf16 input)."""
    import torch
    import torch.nn.functional as F

    x0 = torch.randn(1, seq, hidden).to(torch.bfloat16)
    w = torch.ones(hidden, dtype=torch.bfloat16, requires_grad=True)

    def formula(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)

    def fused(x: torch.Tensor) -> torch.Tensor:
        return w * F.rms_norm(x.float(), (hidden,), eps=1e-5).to(x.dtype)

    out = {}
    for name, fn in (("formula", formula), ("rms_norm", fused)):
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t is not w:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = x0.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(x)
        y.float().sum().backward()
        times = []
        for _ in range(7):
            start = time.perf_counter()
            fn(x).float().sum().backward()
            times.append(time.perf_counter() - start)
        out[name] = {"saved_mib": sum(seen.values()) / MIB, "fwd_bwd_ms": sorted(times)[3] * 1e3}
    return out


def _child(argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["block", "loss", "norm"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: both")
    parser.add_argument("--child", choices=["before", "after"], default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    dtypes = [opts.dtype] if opts.dtype else ["fp32", "bf16"]
    if opts.child:  # one measurement in this fresh process
        import torch

        torch.set_num_threads(1)
        if opts.what == "block":
            if opts.child == "before":
                use_before()
            print(json.dumps(saved_bytes(opts.seq, opts.dtype)))
        else:
            print(json.dumps(loss_peak(opts.child, opts.seq, 2048, 128256, opts.dtype)))
        return
    if opts.what == "norm":
        import torch

        torch.set_num_threads(1)
        print(json.dumps(norm_timing(opts.seq, 2048), indent=1))
        return
    for dtype in dtypes:
        runs = {impl: _child([opts.what, "--seq", str(opts.seq), "--dtype", dtype, "--child", impl])
                for impl in ("before", "after")}
        if opts.what == "block":
            plan = planner_bytes(opts.seq, dtype)
            for impl, r in runs.items():
                print(f"block {dtype} seq {opts.seq} {impl:6s}: saved {r['saved'] / MIB:8.1f} MiB"
                      f" (planner {plan / MIB:.1f} MiB, measured/planner {r['saved'] / plan:.3f}),"
                      f" fwd+bwd {r['step_s']:.3f} s")
            print(f"  after/before saved: {runs['after']['saved'] / runs['before']['saved']:.3f},"
                  f" time: {runs['after']['step_s'] / runs['before']['step_s']:.3f}")
        else:
            for impl, r in runs.items():
                print(f"loss {dtype} seq {opts.seq} vocab 128256 hidden 2048 {impl:6s}: peak above base"
                      f" {r['peak_above_base_mib']:8.1f} MiB, loss {r['loss']:.6f}, fwd+bwd {r['fwd_bwd_s']:.2f} s")
            print(f"  after/before peak: {runs['after']['peak_above_base_mib'] / runs['before']['peak_above_base_mib']:.3f}")


if __name__ == "__main__":
    main()

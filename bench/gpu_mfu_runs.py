"""What each process of ``bench/gpu_mfu.py`` runs: the matmul probe, the external reference, fm-train.

Every measurement runs in a fresh process (:func:`spawn`), so one contender's memory, compile caches,
NCCL communicator or out-of-memory state never leaks into the next. A job is a plain dict (it crosses a
process boundary); a result is a plain dict too.

Both contenders train the recipe's shape at the recipe's split (``micro_batch`` x ``grad_accum``
micro-batches per step) on one fixed batch (data loading is not measured):

- **reference**: ``transformers.LlamaForCausalLM`` built from the same shape's Hugging Face config
  (``attn_implementation="sdpa"``, weights in the run's dtype, built on the device, no download),
  trained by a plain PyTorch loop: ``model(input_ids=ids, labels=ids).loss / grad_accum``, backward,
  for each micro-batch; in bf16 the bf16 gradients are added into fp32 gradients of fp32 master weights
  after every micro-batch, then ``clip_grad_norm_``, ``torch.optim.AdamW(fused=True)`` and a copy back
  to bf16: the numerics of fm-train's bf16 recipe (DeepSpeed bf16, ``grad_accum_dtype: fp32``), so
  neither side buys speed with precision. Decay groups and LR schedule are fm-train's public ones.
  SDPA runs with torch's own backend choice (what a user gets). Compiled: ``torch.compile`` of each
  decoder layer (``LlamaDecoderLayer.compile()``, in place), the granularity of ``parallel.compile``.
- **fm_train**: fm-train's engine (``build_train_module``, ``build_engine``: DeepSpeed with the
  recipe's ZeRO stage, torch's fused AdamW through ``torch_adam``) driven by ``fm_train.engine.train``
  with metrics on; compiled: ``parallel.compile=true`` (each block).

Time is measured the same way for both: warm-up steps (the compile happens in the first) with the last
one timed on its own, then CUDA synchronize, the timed steps, CUDA synchronize. The timed steps are cut
to what fits in the run's own deadline (:func:`gpu_mfu_common.timed_steps`).
"""

from __future__ import annotations

import gc
import os
import resource
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_mfu_common import timed_steps  # bench/ is on the path of every spawned process

Job = dict[str, Any]


# --- processes ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[[Job], dict], job: Job, world: int, port: int, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        queue.put((rank, fn(job)))
    except torch.cuda.OutOfMemoryError:
        queue.put((rank, {"error": "oom"}))
    except BaseException:  # noqa: BLE001 - the parent must learn why
        queue.put((rank, {"error": traceback.format_exc(limit=8)}))


def spawn(fn: Callable[[Job], dict], job: Job, *, timeout_s: float, world: int = 1) -> list[dict]:
    """Run ``fn(job)`` on ``world`` fresh ranks; per-rank results, or ``{"error": ...}`` entries.

    ``job["deadline_at"]`` tells the process when its time is up (``time.monotonic()``, one clock for every
    process of a Linux machine), so it cuts its timed steps to fit; a rank still running after ``timeout_s``
    is killed and reported as ``timeout``.
    """
    import torch.multiprocessing as mp

    job = {**job, "deadline_at": time.monotonic() + timeout_s}
    queue = mp.get_context("spawn").SimpleQueue()
    ctx = mp.start_processes(_entry, args=(fn, job, world, _free_port(), queue), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while not ctx.join(timeout=max(1.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                timed_out = True
                break
    except Exception as exc:  # a rank died without reporting (segfault, NCCL abort)
        return [{"error": f"a rank died: {exc}"}] * world
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    results: dict[int, dict] = {}
    while not queue.empty():
        rank, result = queue.get()
        results[rank] = result
    why = f"timeout: killed after {timeout_s:.0f} s (its share of the time budget)" if timed_out else "no result"
    return [results.get(r, {"error": why}) for r in range(world)]


# --- shared pieces -----------------------------------------------------------------------------

def make_config(job: Job, run_dir: str):
    """The job's fm-train config: the recipe, on one device, at the job's split, with the job's shape and
    precision overrides (``--cpu-smoke``), for ``warmup + steps`` steps, no eval, checkpoints or TensorBoard."""
    from fm_train.config import load_config

    steps = job["warmup"] + job["steps"]
    overrides = [*job.get("overrides", ()), f"run.dir={run_dir}", "cluster.workers=1", "cluster.address=null",
                 f"train.micro_batch={job['micro_batch']}", f"train.grad_accum={job['grad_accum']}",
                 "train.global_batch=null", f"train.steps={steps}", f"train.log_every={steps}",
                 "train.eval_every=0", "optim.warmup_steps=1", "checkpoint.every=0", "logging.tensorboard=false",
                 f"parallel.compile={str(job['compiled']).lower()}"]
    return load_config(job["recipe"], overrides)


def fixed_tokens(vocab: int, micro_batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """One random ``[micro_batch, seq + 1]`` batch, the same for every contender and micro-batch."""
    tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=torch.Generator().manual_seed(0))
    return tokens.to(device)


def _device(job: Job) -> torch.device:
    """``cuda:LOCAL_RANK``, or the CPU in a ``--cpu-smoke`` run."""
    if job.get("device", "cuda") == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gib(device: torch.device) -> float:
    """Peak allocated GPU memory; on a CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(run: Callable[[int], Any], job: Job, device: torch.device) -> dict[str, Any]:
    """Warm-up (``job["warmup"]`` steps, the last one timed alone), then as many of ``job["steps"]`` timed steps
    as fit before the job's deadline (5 s kept for reporting). ``run(n)`` trains ``n`` steps and returns the
    last loss (or None)."""
    deadline = job["deadline_at"] - 5.0
    warm_start = time.perf_counter()
    run(job["warmup"] - 1)
    _sync(device)
    last = time.perf_counter()
    run(1)
    _sync(device)
    now = time.perf_counter()
    step_s, warmup_s = now - last, now - warm_start
    steps = timed_steps(job["steps"], step_s, deadline - time.monotonic())
    if steps == 0:
        return {"error": f"skipped: the time budget ran out after the warm-up ({warmup_s:.0f} s, one step"
                         f" {step_s:.1f} s)", "warmup_s": warmup_s}
    start = time.perf_counter()
    loss = run(steps)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "warmup_s": warmup_s, "last_warmup_step_s": step_s,
            "loss": None if loss is None else float(loss)}


# --- the matmul probe --------------------------------------------------------------------------

def probe(job: Job) -> dict:
    """Device name, data-sheet bf16 peak, measured matmul rate (8192^3 bf16 on a GPU, CUDA events), memory,
    versions, and whether a C compiler is on PATH (Triton, under ``torch.compile``, needs one)."""
    import shutil

    from fm_train.engine.flops import measure_matmul_flops, table_peak_flops

    device = _device(job)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    common = {"torch": torch.__version__, "cuda": torch.version.cuda, "c_compiler": cc}
    if device.type == "cpu":
        return {"device": "cpu", "table_peak": None, "measured_peak": measure_matmul_flops(torch.float32, device),
                "memory_gib": None, **common}
    name = torch.cuda.get_device_name(device)
    measured = measure_matmul_flops(torch.bfloat16, device, size=8192, seconds=2.0)
    _free_memory()
    return {"device": name, "table_peak": table_peak_flops(name, "bf16"), "measured_peak": measured,
            "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30, **common}


def _compile_report(job: Job, what: str) -> dict[str, Any]:
    """What was compiled and how many distinct graphs dynamo built: one per block shape is expected (blocks
    share a graph); many more would mean recompiles, and past torch's recompile limit, blocks left eager."""
    if not job["compiled"]:
        return {"compile": None}
    from torch._dynamo.utils import counters

    return {"compile": what, "compile_backend": job.get("compile_backend", "inductor"),
            "compiled_graphs": int(counters["stats"]["unique_graphs"])}


# --- the external reference --------------------------------------------------------------------

class ReferenceLoop:
    """``transformers.LlamaForCausalLM`` (SDPA) trained by a plain PyTorch loop; see the module docstring."""

    def __init__(self, job: Job) -> None:
        from transformers import AutoModelForCausalLM

        from fm_train.engine import build_lr_scheduler, weight_decay_groups
        from fm_train.families import family_of

        self.cfg = cfg = make_config(job, "unused")
        self.device = _device(job)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
        hf_config = family_of(cfg.model).hf.config(cfg.model.model_dump(), dtype=cfg.precision, bos=None, eos=None)
        hf_config.use_cache = False
        torch.manual_seed(cfg.run.seed)
        with self.device:
            self.model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
        self.model.train()
        if job["compiled"]:
            for layer in self.model.model.layers:
                layer.compile(backend=job.get("compile_backend", "inductor"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # bf16: fp32 master weights and gradients (DeepSpeed's bf16 recipe); fp32: the parameters themselves.
        self.master = [p.detach().float() if p.dtype != torch.float32 else p for p in self.params]
        self.separate = any(m is not p for m, p in zip(self.master, self.params))
        if self.separate:
            for m in self.master:
                m.grad = torch.zeros_like(m)
        by_id = {id(p): m for p, m in zip(self.params, self.master)}
        o = cfg.optim
        groups = [{"params": [by_id[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in weight_decay_groups(self.model, o.weight_decay)]
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)  # as fm-train's
        self.sched = build_lr_scheduler(self.opt, o, cfg.train.steps)
        tokens = fixed_tokens(cfg.model.vocab_size, cfg.train.micro_batch, cfg.data.seq_len, self.device)
        self.ids = tokens[:, :-1].contiguous()  # transformers shifts the labels itself

    def step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; the mean micro-batch loss."""
        accum = self.cfg.train.grad_accum
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss / accum
            loss.backward()
            total += loss.detach().float()
            if self.separate:
                with torch.no_grad():
                    torch._foreach_add_([m.grad for m in self.master], [p.grad for p in self.params])
                self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch.nn.utils.clip_grad_norm_(self.master, self.cfg.optim.grad_clip, foreach=True)
            self.opt.step()
            self.sched.step()
            if self.separate:
                torch._foreach_copy_(self.params, self.master)
                torch._foreach_zero_([m.grad for m in self.master])
            else:
                self.opt.zero_grad(set_to_none=True)
        return total


def reference(job: Job) -> dict:
    """Build and time the reference; the figures the parent turns into tokens/s and MFU."""
    started = time.monotonic()
    loop = ReferenceLoop(job)
    build_s = time.monotonic() - started

    def run(n: int) -> torch.Tensor | None:
        loss = None
        for _ in range(n):
            loss = loop.step()
        return loss

    timed = _timed(run, job, loop.device)
    return {"build_s": build_s, **timed, "micro_batch": loop.cfg.train.micro_batch,
            "grad_accum": loop.cfg.train.grad_accum, "parameters": sum(p.numel() for p in loop.params),
            "peak_mem_gib": _peak_mem_gib(loop.device),
            "fused_adamw": bool(loop.opt.defaults.get("fused")), **_compile_report(job, "each LlamaDecoderLayer")}


# --- fm-train ----------------------------------------------------------------------------------

def _built_ops(extensions_dir: str) -> set[str]:
    """What DeepSpeed's JIT builds left under ``TORCH_EXTENSIONS_DIR`` (``<torch/cuda tag>/<op>``)."""
    root = Path(extensions_dir)
    return {str(p.relative_to(root)) for p in root.glob("*/*")} if root.is_dir() else set()


def fm_train(job: Job) -> dict:
    """fm-train's engine and loop on one device; compiled with ``parallel.compile=true``."""
    import torch.distributed as dist

    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.dist.process_group import shutdown_distributed
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.engine.compile import compile_blocks
    from fm_train.engine.loop import throughput_spec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    started = time.monotonic()
    extensions = ensure_extension_cache()
    ops_before = _built_ops(extensions)
    init_distributed(RankEnv.from_environ())
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = make_config(job, run_dir)
            family = family_of(cfg.model)
            blocks = family.modules().block_types
            module = build_train_module(cfg, family, None)
            if job["compiled"] and job.get("compile_backend", "inductor") != "inductor":
                # --cpu-smoke: compile the blocks with a tracing-only backend first; build_engine's own
                # compile_blocks (parallel.compile=true) then finds them compiled and leaves them.
                compile_blocks(module, blocks, backend=job["compile_backend"])
            engine, scheduler = build_engine(cfg, module, blocks=blocks)
            device = torch.device(engine.device)
            tokens = fixed_tokens(cfg.model.vocab_size, cfg.train.micro_batch, cfg.data.seq_len, device)
            batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                     "state": {}, "receipt": ""}
            batches = iter(lambda: batch, None)
            state = TrainState(lr_scheduler=scheduler)
            sink = MetricsSink(run_dir, enabled=dist.get_rank() == 0, tensorboard=False, stream=open(os.devnull, "w"))
            spec = throughput_spec(cfg, family, device)
            build_s = time.monotonic() - started

            def run(n: int) -> None:  # one record per call (the loop logs its last step): no per-step sync
                if n > 0:
                    upto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": state.step + n})})
                    train(engine, batches, state, upto, sink=sink, spec=spec)

            timed = _timed(run, job, device)
            sink.close()
            last = _last_record(run_dir)
            fused = bool(getattr(engine, "basic_optimizer", None) and engine.basic_optimizer.defaults.get("fused"))
            return {"build_s": build_s, **timed, "loss": last.get("loss"), "micro_batch": cfg.train.micro_batch,
                    "grad_accum": cfg.train.grad_accum, "zero_stage": cfg.parallel.zero_stage,
                    "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
                    "meter_tokens_per_s": last.get("tokens_per_s"), "meter_mfu": last.get("mfu"),
                    "peak_mem_gib": _peak_mem_gib(device), "fused_adamw": fused,
                    "ops_built_during_run": sorted(_built_ops(extensions) - ops_before),
                    **_compile_report(job, "each block (parallel.compile=true)")}
    finally:
        shutdown_distributed()


def _last_record(run_dir: str) -> dict:
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    return json.loads(lines[-1]) if lines else {}

"""What each process of ``bench/gpu_mfu.py`` runs: the bare PyTorch loop, fm-train, the matmul probe.

Every measurement runs in fresh processes (:func:`spawn`), so one contender's memory, NCCL
communicator or out-of-memory state never leaks into the next one. A job is a plain dict (it
crosses a process boundary); a result is a plain dict too.

Both contenders train the same model (``build_train_module``, bf16 weights) on the same fixed
batch, with fp32 master weights, fused AdamW, the same decay groups, LR schedule and gradient
clipping, inside the same SDPA backend context. Their time is measured the same way: a CUDA
synchronize, ``steps`` steps, a CUDA synchronize, after ``warmup`` steps that are not counted.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

Job = dict[str, Any]


# --- processes ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[[Job], dict], job: Job, world: int, port: int, queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        queue.put((rank, fn(job)))
    except torch.cuda.OutOfMemoryError:
        queue.put((rank, {"error": "oom"}))
    except BaseException:  # noqa: BLE001 - the parent must learn why
        queue.put((rank, {"error": traceback.format_exc(limit=8)}))


def spawn(fn: Callable[[Job], dict], job: Job, *, world: int, timeout_s: float) -> list[dict]:
    """Run ``fn(job)`` on ``world`` ranks (one per GPU); per-rank results, or ``{"error": ...}`` entries.

    A rank that does not finish within ``timeout_s`` is killed and reported as ``timeout``.
    """
    import torch.multiprocessing as mp

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
    return [results.get(r, {"error": "timeout" if timed_out else "no result"}) for r in range(world)]


# --- shared pieces -----------------------------------------------------------------------------

def make_config(job: Job, run_dir: str):
    """The fm-train config of a job: the 1.1B preset shape, bf16, the job's layout and batch."""
    from fm_train.config import build_config

    tp, pp, world = job.get("tp", 1), job.get("pp", 1), job.get("world", 1)
    return build_config({
        "run": {"dir": run_dir, "seed": 1},
        "model": {"preset": job["preset"], "max_seq_len": max(job["seq"], 2048)},
        "precision": "bf16" if job.get("device", "cuda") == "cuda" else "fp32",
        "parallel": {"tp": tp, "pp": pp, "zero_stage": job.get("zero", 1), "compile": job.get("compile", False)},
        "cluster": {"workers": world},
        "data": {"seq_len": job["seq"]},
        "train": {"steps": job["warmup"] + job["steps"], "micro_batch": job["micro_batch"],
                  "grad_accum": job.get("grad_accum", 1), "eval_every": 0, "log_every": job["steps"]},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": min(10, job["warmup"]), "weight_decay": 0.1, "grad_clip": 1.0},
        "checkpoint": {"every": 0},
        "logging": {"tensorboard": False},
    })


def fixed_batch(vocab: int, micro_batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One random batch, the same for every contender and step (data loading is not measured)."""
    tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _device(job: Job) -> torch.device:
    """GPU 0 of the process (each rank sees all GPUs and is bound to ``cuda:LOCAL_RANK`` by fm-train),
    or the CPU in a ``--device cpu`` smoke run."""
    if job.get("device", "cuda") == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the matmul probe --------------------------------------------------------------------------

def probe(job: Job) -> dict:
    """Device name, data-sheet bf16 peak, measured bf16 matmul rate (8192^3, CUDA events), memory."""
    from fm_train.engine.flops import measure_matmul_flops, table_peak_flops

    device = _device(job)
    if device.type == "cpu":
        return {"device": "cpu", "table_peak": None, "measured_peak": measure_matmul_flops(torch.float32, device),
                "memory_gib": None, "torch": torch.__version__, "cuda": None}
    name = torch.cuda.get_device_name(device)
    measured = measure_matmul_flops(torch.bfloat16, device, size=job.get("matmul_size", 8192), seconds=2.0)
    _free_memory()
    return {"device": name, "table_peak": table_peak_flops(name, "bf16"), "measured_peak": measured,
            "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda}


# --- the bare PyTorch loop ---------------------------------------------------------------------

class BareLoop:
    """bf16 weights, fp32 master weights with fused AdamW: DeepSpeed's bf16 recipe in plain torch."""

    def __init__(self, job: Job) -> None:
        from fm_train.dist.device import attention_context
        from fm_train.engine import build_lr_scheduler, weight_decay_groups
        from fm_train.engine.train_module import build_train_module
        from fm_train.families import family_of

        self.cfg = make_config(job, "unused")
        self.device = _device(job)
        self.module = build_train_module(self.cfg, family_of(self.cfg.model)).to(self.device, torch.bfloat16)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        by_id = {id(p): m for p, m in zip(self.params, self.master)}
        o = self.cfg.optim
        groups = [{"params": [by_id[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                  for g in weight_decay_groups(self.module, o.weight_decay)]
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        self.sched = build_lr_scheduler(self.opt, o, self.cfg.train.steps)
        self.context = attention_context("cuda" if self.device.type == "cuda" else "cpu")

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.module(ids, labels)
        loss.backward()
        with torch.no_grad():
            torch._foreach_copy_([m.grad for m in self.master], [p.grad for p in self.params])
            torch.nn.utils.clip_grad_norm_(self.master, self.cfg.optim.grad_clip, foreach=True)
            self.opt.step()
            self.sched.step()
            torch._foreach_copy_(self.params, self.master)
        self.module.zero_grad(set_to_none=True)
        return loss.detach()

    def fits(self, micro_batch: int) -> bool:
        """Two steps at ``micro_batch`` without running out of memory (the second holds optimizer states)."""
        ids, labels = fixed_batch(self.cfg.model.vocab_size, micro_batch, self.cfg.data.seq_len, self.device)
        try:
            for _ in range(2):
                self.step(ids, labels)
            _sync(self.device)
            return True
        except torch.cuda.OutOfMemoryError:
            self.module.zero_grad(set_to_none=True)
            return False
        finally:
            del ids, labels
            _free_memory()


def bare(job: Job) -> dict:
    """The bare loop: find the micro-batch (``job["search"]``) or take ``job["micro_batch"]``, then time it."""
    from gpu_mfu_common import pick_micro_batch  # the bench's pure search rule

    loop = BareLoop({**job, "micro_batch": 1})
    with loop.context:
        micro_batch = pick_micro_batch(job["search"], loop.fits) if job.get("search") else job["micro_batch"]
        if micro_batch is None:
            return {"error": f"no micro-batch of {job['search']} fits"}
        ids, labels = fixed_batch(loop.cfg.model.vocab_size, micro_batch, job["seq"], loop.device)
        for _ in range(job["warmup"]):
            loop.step(ids, labels)
        _sync(loop.device)
        start = time.perf_counter()
        for _ in range(job["steps"]):
            loss = loop.step(ids, labels)
        _sync(loop.device)
        seconds = time.perf_counter() - start
    return {"micro_batch": micro_batch, "seconds": seconds, "steps": job["steps"], "loss": loss.item(),
            "peak_mem_gib": _peak_mem_gib(loop.device)}


# --- fm-train ----------------------------------------------------------------------------------

def fm_train(job: Job) -> dict:
    """fm-train's engine and loop (``fm_train.engine.train`` with metrics on), any layout, one rank."""
    import torch.distributed as dist

    from fm_train.dist.env import RankEnv, ensure_extension_cache
    from fm_train.dist.groups import ParallelGroups
    from fm_train.dist.topology import Topology
    from fm_train.engine import MetricsSink, TrainState, build_engine, train
    from fm_train.deepspeed_adapter.comm import init_distributed
    from fm_train.dist.process_group import shutdown_distributed
    from fm_train.engine.loop import throughput_spec
    from fm_train.engine.train_module import build_train_module
    from fm_train.families import family_of

    ensure_extension_cache()
    init_distributed(RankEnv.from_environ())
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = make_config(job, run_dir)
            topo = Topology(world=cfg.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
            groups = ParallelGroups(topo) if topo.world > 1 else None
            family = family_of(cfg.model)
            module = build_train_module(cfg, family, groups if topo.tp * topo.pp > 1 else None)
            mpu = groups if topo.tp > 1 and topo.pp == 1 else None
            engine, scheduler = build_engine(cfg, module, blocks=family.modules().block_types, mpu=mpu)
            ids, labels = fixed_batch(cfg.model.vocab_size, cfg.train.micro_batch, cfg.data.seq_len, engine.device)
            batches = iter(lambda: {"input_ids": ids, "labels": labels, "state": {}, "receipt": ""}, None)
            state = TrainState(lr_scheduler=scheduler)
            sink = MetricsSink(run_dir, enabled=dist.get_rank() == 0, tensorboard=False, stream=open(os.devnull, "w"))
            spec = throughput_spec(cfg, family, engine.device)
            group = groups.get_data_parallel_group() if groups is not None else None

            def upto(steps: int):
                return cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})

            device = torch.device(engine.device)
            train(engine, batches, state, upto(job["warmup"]), sink=sink, spec=spec, group=group)
            _sync(device)
            start = time.perf_counter()
            train(engine, batches, state, upto(job["warmup"] + job["steps"]), sink=sink, spec=spec, group=group)
            _sync(device)
            seconds = time.perf_counter() - start
            sink.close()
            last = _last_record(run_dir) if dist.get_rank() == 0 else {}
            fused = bool(getattr(engine, "basic_optimizer", None) and engine.basic_optimizer.defaults.get("fused"))
            return {"micro_batch": cfg.train.micro_batch, "grad_accum": cfg.train.grad_accum, "seconds": seconds,
                    "steps": job["steps"], "loss": last.get("loss"), "meter_tokens_per_s": last.get("tokens_per_s"),
                    "meter_mfu": last.get("mfu"), "peak_mem_gib": _peak_mem_gib(device),
                    "fused_adamw": fused}
    finally:
        shutdown_distributed()


def _last_record(run_dir: str) -> dict:
    import json

    lines = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()
    return json.loads(lines[-1]) if lines else {}

"""Typed configuration of an fm-train run.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error, never a
silently ignored value. Field-local rules (positive sizes, enums) live on the fields; rules that tie
several fields together live in :mod:`fm_train.config.rules` and run once, at load time.

Config holds values only. Live objects (process groups, engines, loaders) are build arguments.
"""

from __future__ import annotations

import math
import types
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationInfo, field_validator)


# Upper bounds on counts, where a huge value would hang `plan` (one table row per worker) or allocate
# without end at start. Each is far above any real run: a million workers, a billion steps.
MAX_WORKERS = 1 << 20
MAX_STEPS = 10**9
MAX_WIDTH = 1 << 22  # hidden, ffn_hidden, vocabulary rows, sequence lengths
MAX_HEADS = 1 << 16
MAX_LAYERS = 1 << 14
MAX_BATCH = 1 << 20


def leaf_types(annotation: Any) -> set[type]:
    """The plain types a field annotation admits (through Optional, Union, Annotated; Literal by its values)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return leaf_types(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return set().union(*(leaf_types(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    return {origin or annotation} if isinstance(origin or annotation, type) else set()


def _refuse_odd_scalar(value: Any, annotation: Any) -> None:
    """Raise on a boolean for a number (lax pydantic reads true as 1) and on inf/nan."""
    leaves = leaf_types(annotation)
    if isinstance(value, bool) and bool not in leaves and leaves & {int, float}:
        raise ValueError("a boolean (true/false) is not a number; write the number")
    if isinstance(value, float) and not math.isfinite(value) and float in leaves:
        raise ValueError("must be a finite number")
    args = [a for a in get_args(annotation) if a is not Ellipsis] if get_origin(annotation) in (tuple, list) else []
    if isinstance(value, (list, tuple)) and args:  # optim.betas: [true, 0.95] is no pair of floats either
        for i, item in enumerate(value):
            _refuse_odd_scalar(item, args[min(i, len(args) - 1)])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Booleans are not counts and inf/nan are not sizes, whatever pydantic's lax mode would coerce."""
        if info.field_name is not None:
            _refuse_odd_scalar(value, cls.model_fields[info.field_name].annotation)
        return value


class RunConfig(_Section):
    """Where the run lives and how it is seeded."""

    name: str = Field("demo", description="Name shown in logs and the Hugging Face README.")
    dir: str = Field("runs/demo", description="Run directory: config, metrics, logs, checkpoints, hf/.")
    seed: int = Field(1234, ge=-(2**63), lt=2**64,
                      description="Seed of model init, data order and dropout-free RNG streams.")
    storage: Optional[str] = Field(
        None, description="Where checkpoints are copied, as they are saved, for runs without a shared run.dir: an"
                          " object-store URI (s3://bucket/prefix) or a mounted path. Each rank saves to run.dir and"
                          " uploads in the background; a step counts in storage once its manifest is there."
                          " Resume fetches what each node's ranks read of the newest committed step when run.dir"
                          " lacks it. Rank 0 also copies metrics.jsonl, failures.jsonl, config.resolved.yaml and"
                          " tensorboard/ here after each committed step.")


class MoEConfig(_Section):
    """Routed experts of a Mixture-of-Experts model (``model.family: qwen3_moe``)."""

    experts: PositiveInt = Field(8, le=MAX_HEADS, description="Experts per routed block (E).")
    top_k: PositiveInt = Field(2, le=MAX_HEADS, description="Experts each token is routed to (k <= E).")
    expert_ffn_hidden: Optional[PositiveInt] = Field(
        None, le=MAX_WIDTH, description="SwiGLU width of one expert (HF moe_intermediate_size); null: model.ffn_hidden.")
    dense_layers: NonNegativeInt = Field(
        0, le=MAX_LAYERS, description="The first this many blocks keep a dense SwiGLU MLP of model.ffn_hidden"
                                      " (HF mlp_only_layers = [0 .. dense_layers - 1]).")
    norm_topk_prob: bool = Field(True, description="Renormalise the k chosen experts' router probabilities to sum"
                                                   " to 1 (Qwen3-MoE, Mixtral: true; OLMoE: false).")
    aux_loss_coef: NonNegativeFloat = Field(
        0.001, description="Weight of the load-balancing loss (E * sum_e f_e * P_e per routed block, averaged"
                           " over blocks); logged as moe_aux_loss.")
    z_loss_coef: NonNegativeFloat = Field(
        0.0, description="Weight of the router z-loss (mean squared logsumexp of the router logits); logged as"
                         " moe_z_loss.")
    capacity_factor: Optional[PositiveFloat] = Field(
        None, description="null: dropless (every token reaches its k experts). A number: each expert takes at most"
                          " ceil(capacity_factor * tokens * k / E) token copies of a micro-batch, in token order;"
                          " the rest are dropped and counted in moe_dropped. Must be >= 1.0.")


class ModelConfig(_Section):
    """Family and shape of the model. ``preset`` fills unset fields from a named shape."""

    family: str = Field(
        "llama", max_length=64,
        description="Model family (fm_train.families): llama, a decoder trained on next-token prediction;"
                    " bert, an encoder trained on masked-token prediction (BertForMaskedLM); qwen3_moe, a"
                    " Mixture-of-Experts decoder (Qwen3MoeForCausalLM), with its routing in model.moe.")
    preset: Optional[str] = Field(None, description="Named shape (tiny, 125m, 1.1b, 7b, 13b, 70b; bert-tiny,"
                                                    " bert-base, bert-large; moe-tiny, olmoe-1b-7b, qwen3-30b-a3b,"
                                                    " mixtral-8x7b).")
    n_layers: PositiveInt = Field(4, le=MAX_LAYERS, description="Number of decoder blocks.")
    hidden: PositiveInt = Field(128, le=MAX_WIDTH, description="Model width (embedding size).")
    n_heads: PositiveInt = Field(4, le=MAX_HEADS, description="Attention (query) heads.")
    n_kv_heads: PositiveInt = Field(2, le=MAX_HEADS,
                                    description="Key/value heads (grouped-query attention; bert: = n_heads).")
    ffn_hidden: PositiveInt = Field(344, le=MAX_WIDTH, description="MLP inner width (llama: SwiGLU, bert: GELU).")
    vocab_size: Union[Literal["auto"], Annotated[int, Field(gt=0, le=MAX_WIDTH)]] = Field(
        "auto", description="Tokens the model knows. auto: the first data source's tokenizer (its index.json) plus"
        " the family's special tokens it lacks (bert: [CLS], [SEP], [MASK], [PAD]), resolved before the model is"
        " built and saved as a number in config.resolved.yaml and every checkpoint; a default_corpus source not"
        " built yet counts as its tokenizer's size (data_shards.DEFAULT_CORPUS_VOCAB). A number: used as given, at"
        " least the tokenizer's vocabulary (plus the family's special tokens). Presets set the published model's.")
    vocab_multiple: PositiveInt = Field(
        128,
        le=MAX_WIDTH,
        description="Embedding and head rows are vocab_size rounded up to a multiple of this, so that tensor"
        " parallelism splits any vocabulary; the padding is never trained on or predicted, and exports keep"
        " vocab_size rows. Must be divisible by parallel.tp. 1: no padding.",
    )
    max_seq_len: PositiveInt = Field(256, le=MAX_WIDTH,
                                     description="Longest sequence (llama: RoPE tables; bert: learned position"
                                                 " embeddings).")
    head_dim: Optional[PositiveInt] = Field(
        None, le=MAX_WIDTH, description="qwen3_moe: width of one attention head (Qwen3 models: 128 whatever the width);"
                                        " null: hidden / n_heads. llama and bert: leave null.")
    moe: Optional[MoEConfig] = Field(
        None, description="Mixture-of-Experts families (qwen3_moe): the routed experts (the presets moe-tiny,"
                          " olmoe-1b-7b, qwen3-30b-a3b and mixtral-8x7b fill it); other families: unset.")
    type_vocab_size: PositiveInt = Field(2, le=MAX_HEADS, description="bert: token-type (segment) embeddings.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output head.")
    rope_theta: PositiveFloat = Field(10000.0, description="llama: RoPE base frequency.")
    norm_eps: PositiveFloat = Field(1e-5, description="RMSNorm (llama) or LayerNorm (bert) epsilon.")
    qkv_bias: bool = Field(False, description="llama: bias on the q/k/v/o projections (HF LlamaConfig.attention_bias);"
                                              " bert always has biases.")
    init_std: PositiveFloat = Field(0.02, description="Std of the normal weight init.")
    init_from: Optional[str] = Field(
        None,
        description="Continued pretraining: a Hugging Face Llama dir (config.json + safetensors) whose weights"
        " replace the seeded init in every layout. Shape fields left unset are taken from its config.json;"
        " one set to a different value is an error (only max_seq_len may differ). Ignored on resume.",
    )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head (``fm_train.model.base.padded_vocab_size``, torch-free here)."""
        if self.vocab_size == "auto":  # a bug, not a user error: every consumer gets the resolved config
            raise ValueError("model.vocab_size is still auto: resolve it first (fm_train.families.vocab.resolve_vocab)")
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


class ParallelConfig(_Section):
    """How the model is split: world = pp x dp x tp, dp derived from ``cluster.workers``."""

    tp: PositiveInt = Field(1, le=MAX_WORKERS, description="Tensor-parallel size (ranks that split each matmul).")
    pp: PositiveInt = Field(1, le=MAX_WORKERS, description="Pipeline-parallel size (stages).")
    ep: PositiveInt = Field(
        1, le=MAX_WORKERS, description="Expert-parallel size: each group of ep data-parallel ranks splits every"
                                       " routed block's experts (E / ep each) and exchanges tokens all-to-all;"
                                       " must divide the data-parallel size and model.moe.experts.")
    sp: PositiveInt = Field(
        1, le=MAX_WORKERS, description="Sequence-parallel size (Ulysses): each group of sp data-parallel ranks"
                                       " shares its samples, each rank holding seq_len / sp tokens; an all-to-all"
                                       " around attention swaps the sequence split for a head split. Must divide"
                                       " the data-parallel size, data.seq_len and the heads per tp rank.")
    tp_sequence_parallel: bool = Field(
        False, description="Sequence parallelism inside tensor parallelism (Megatron-style): outside the tp matmuls"
                           " (norms, residual adds) each tp rank holds seq_len / tp tokens, the tp all-reduces"
                           " become reduce-scatter + all-gather; activation memory of those regions / tp. Needs"
                           " tp > 1.")
    tp_overlap: bool = Field(
        True, description="tp > 1: each region's column linears (q/k/v, gate/up) compute their weight gradients while"
                          " the region's input-gradient all-reduce (reduce-scatter with tp_sequence_parallel) is in"
                          " flight, as Megatron-Core does; false: the collective first, then the rest of backward."
                          " Not under ZeRO-3 (its weights are partitioned when a region starts) nor in compiled blocks.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO >= 1).")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward.")
    recompute_blocks: Optional[PositiveInt] = Field(
        None, le=MAX_LAYERS, description="With activation_checkpointing: recompute only the first N blocks of each"
        " pipeline stage (of the model when pp=1); the others keep their activations. null: every block. Each"
        " recomputed block costs one more forward of it; `fm-train plan --fit GIB` names the fewest that fit.")
    compile: bool = Field(
        False, description="torch.compile each decoder block (fuses norms, RoPE and SwiGLU; costs a compile at start)."
    )


class PrecisionFlags(_Section):
    """DeepSpeed-style mapping form of ``precision`` (``{bf16: true}``); at most one may be on."""

    bf16: bool = False
    fp16: bool = False


Precision = Literal["bf16", "fp16", "fp32"]


class DataSource(_Section):
    """One shard directory and its mixing weight."""

    path: str = Field(..., description="Directory written by `fm-train shard` (holds index.json): a local or shared"
                      " path, or an object-store URI such as s3://bucket/prefix.")
    name: Optional[str] = Field(
        None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Short name of the source (letters, digits, _ . -), used by data.schedule and in the per-source"
                    " metrics (tokens_seen/NAME, loss/NAME); null: the last part of the path.")
    weight: PositiveFloat = Field(1.0, description="Relative share of samples drawn from this source (without"
                                                   " data.schedule; with one, the schedule's weights apply).")
    default_corpus: bool = Field(
        False, description="If the directory is missing, build it from the Python standard library source."
    )


class MixturePhase(_Section):
    """One phase of data.schedule: constant weights, or a linear ramp from the previous phase's weights."""

    until_step: Optional[PositiveInt] = Field(
        None, le=MAX_STEPS, description="The phase covers the steps from the previous phase's until_step (0 for the"
                                        " first) up to this one, exclusive; null: to the end of training (last phase"
                                        " only).")
    weights: Optional[dict[str, float]] = Field(
        None, description="Constant weights by source name (or path); sources not named get 0.")
    ramp_to: Optional[dict[str, float]] = Field(
        None, description="Instead of weights: ramp linearly, step by step, from the previous phase's weights to"
                          " these (reached at the phase's last step); needs until_step.")


class DataConfig(_Section):
    """Training data: shard directories, sample length and the reader's policies."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(path="data/stdlib", weight=1.0, default_corpus=True)],
        description="Shard directories mixed by weight.",
    )
    schedule: Optional[list[MixturePhase]] = Field(
        None, description="The sources' weights over training: phases that follow each other, each constant weights"
                          " or a linear ramp (e.g. a final annealing phase on a high-quality source); null: the"
                          " static data.sources weights. A resumed run may change phases after its step, never"
                          " before (see docs/data.md).")
    seq_len: PositiveInt = Field(256, le=MAX_WIDTH, description="Tokens per training sample (shards hold seq_len + 1).")
    num_workers: NonNegativeInt = Field(1, le=1024, description="DataLoader worker processes per rank.")
    on_bad_shard: Literal["fail", "skip"] = Field(
        "fail", description="A bad shard: fail (stop, naming it) or skip (leave it out on every rank; one found"
                            " mid-run is recorded in RUN/bad_shards/ and left out after a restart from the last"
                            " checkpoint).")
    verify_sha256: bool = Field(True, description="Check each shard's sha256 against index.json the first time a"
                                " node reads it (a mismatch is a bad shard); object-store shards only through"
                                " data.cache_dir.")
    val_fraction: float = Field(0.01, ge=0.0, lt=0.5, description="Share of samples held out for validation.")
    shuffle: Literal["global", "window"] = Field(
        "global", description="Training order of each epoch: global (a pseudorandom permutation of all of a"
                              " source's samples, read by random access) or window (shards permuted, then"
                              " windows of shuffle_window consecutive samples: contiguous reads for slow storage).")
    shuffle_window: PositiveInt = Field(1024, le=1 << 30, description="Samples shuffled together within a window"
                                                          " (data.shuffle: window).")
    cache_dir: Optional[str] = Field(
        "~/.cache/fm-train/shards",
        description="Node-local directory that keeps whole shards of object-store sources (s3://...) after their"
                    " first read, shared by the node's ranks and loader workers (unused for local sources); null:"
                    " every read is a ranged GET (no disk, but one request per contiguous run of samples).")
    document_masking: bool = Field(
        False, description="Attention within documents: a token of a packed sample attends only to the earlier"
                           " tokens of its own document (documents end at the tokenizer's EOS token).")
    cache_gb: PositiveFloat = Field(50.0, description="Size bound of data.cache_dir; least recently used shards"
                                                      " are deleted beyond it.")


class TrainConfig(_Section):
    """Step counts and batch shape."""

    steps: PositiveInt = Field(300, le=MAX_STEPS, description="Optimizer steps to train in total.")
    micro_batch: PositiveInt = Field(4, le=MAX_BATCH, description="Sequences per rank per forward pass.")
    grad_accum: PositiveInt = Field(1, le=MAX_BATCH, description="Micro-batches accumulated per optimizer step.")
    global_batch: Optional[PositiveInt] = Field(
        None, le=MAX_BATCH * MAX_BATCH * MAX_WORKERS,
        description="Optional check: must equal micro_batch x grad_accum x dp."
    )
    eval_every: NonNegativeInt = Field(100, le=MAX_STEPS, description="Validation every N steps (0: never).")
    eval_batches: PositiveInt = Field(8, le=MAX_BATCH, description="Micro-batches per validation.")
    log_every: PositiveInt = Field(10, le=MAX_STEPS, description="Metrics line every N steps.")
    grad_accum_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="precision=bf16: the dtype gradients are accumulated and reduced in over the micro-batches"
        " of a step (DeepSpeed's data_types.grad_accum_dtype). fp32 keeps the small contributions that bf16's 8-bit"
        " mantissa rounds away over many micro-batches; bf16 halves the gradient buffers. ZeRO-0 always accumulates"
        " in bf16 (DeepSpeed has no fp32 path there). Ignored for fp32 runs.")


class OptimConfig(_Section):
    """AdamW and the learning-rate schedule."""

    lr: PositiveFloat = Field(3.0e-3, description="Peak learning rate.")
    min_lr: float = Field(3.0e-4, ge=0.0, description="Learning rate at the end of decay.")
    warmup_steps: NonNegativeInt = Field(30, le=MAX_STEPS, description="Linear warmup steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW decay (not applied to norms and biases).")
    grad_clip: float = Field(1.0, ge=0.0, description="Global gradient-norm clip (0: off).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: PositiveFloat = Field(1e-8, description="AdamW epsilon.")


class CheckpointConfig(_Section):
    """When checkpoints are written and what a start resumes from."""

    every: NonNegativeInt = Field(100, le=MAX_STEPS, description="Save every N steps (0: only at the end).")
    keep: PositiveInt = Field(3, le=MAX_STEPS,
                              description="Keep the newest K checkpoints (never the one `latest` names).")
    resume: str = Field(
        "auto", description="auto (from the newest intact checkpoint if any) | latest (the same, but none is an"
                            " error) | none | STEP (RUN/checkpoints/step_STEP) | path to a step directory. A"
                            " restart after a failure continues from what the run saved since.")
    allow_fresh_start: bool = Field(
        False, description="With resume: auto, train from scratch when RUN/checkpoints holds checkpoints but none is"
        " intact (each is moved aside to step_XXXXXXXX.damaged). Off: such a start is refused (exit 2), so a damaged"
        " disk never silently overwrites a run.")
    trust_pickles: bool = Field(
        False, description="Load resume checkpoints with full unpickling (torch.load weights_only=False), which runs"
        " code the files name. Off: tensors and DeepSpeed's plain records only; any other object is refused.")
    upload_retries: NonNegativeInt = Field(
        5, le=16, description="With run.storage: retries of each file upload (waits 1, 2, 4, ... s) before the step is"
                       " given up in storage (it stays on local disk; latest there keeps the previous step).")


class ConvertConfig(_Section):
    """Export to a Hugging Face directory at the end of training, and during it."""

    at_end: bool = Field(True, description="Convert the final checkpoint to RUN/hf.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Dtype of the exported weights.")
    every: NonNegativeInt = Field(
        0, le=MAX_STEPS, description="During training, export every N steps (a multiple of checkpoint.every) to a"
                                     " verified RUN/hf_steps/step_XXXXXXXX (RUN/hf_steps/latest names the newest),"
                                     " by a low-priority process once the step's checkpoint is committed; uploaded"
                                     " to run.storage/hf_steps/ when set. 0: never.")
    keep: PositiveInt = Field(2, le=1_000_000, description="Exports of convert.every kept (the newest; one that"
                                                           " `fm-train eval` is reading is kept until it is done).")
    end_wait_s: NonNegativeFloat = Field(
        600, description="At the end of training, how long to wait for the export in progress of convert.every"
                         " before stopping it (nothing half-written is left).")


class ClusterConfig(_Section):
    """Resources: how many workers, where, and how failures are handled."""

    address: Optional[str] = Field(None, description="Ray address to join (null: a private local Ray).")
    workers: PositiveInt = Field(2, le=MAX_WORKERS, description="World size: one worker per device slot.")
    slots_per_node: Optional[PositiveInt] = Field(
        None, le=MAX_WORKERS, description="Device slots per node, for planning (null: all workers on one node)."
    )
    cpus_per_worker: PositiveFloat = Field(1, description="Ray CPUs reserved per worker.")
    gpus_per_worker: float = Field(0, ge=0, description="Ray GPUs reserved per worker (0 or 1 in practice).")
    gpu_memory_gib: Optional[PositiveFloat] = Field(
        None, le=100_000, description="Memory of each GPU in GiB, which `fm-train plan` holds the planned peak"
                                      " against (null: the card of this machine, when it has one).")
    gpu_peak_tflops: Optional[PositiveFloat] = Field(
        None, le=1e6, description="Data-sheet dense peak of each GPU in TFLOP/s at the run's precision (989 for an"
                                  " H100 SXM in bf16), from which `fm-train plan` estimates the step time (null: the"
                                  " card of this machine, when it has one).")
    max_restarts: NonNegativeInt = Field(3, le=1_000_000, description="Whole-group restarts after a worker failure.")
    step_timeout_s: PositiveFloat = Field(600, description="A step slower than this counts as a hang.")
    save_timeout_s: PositiveFloat = Field(
        3600, description="A checkpoint save (writing, committing, handing to the upload) slower than this counts as a"
                          " hang; while a rank saves, this replaces step_timeout_s (a large model's save to slow storage"
                          " can take far longer than a step).")
    startup_timeout_s: PositiveFloat = Field(
        1800, description="Silence allowed before the first metrics record (imports, model build, checkpoint"
                          " load, op builds); step_timeout_s applies from then on.")
    socket_ifname: Optional[str] = Field(
        None, description="Network interface gloo and NCCL use on every node (GLOO_SOCKET_IFNAME,"
                          " NCCL_SOCKET_IFNAME). null: the interface that carries each node's Ray address, unless"
                          " those variables were exported before `ray start` on that node.")
    min_workers: Optional[PositiveInt] = Field(
        None, le=MAX_WORKERS,
        description="When a node is lost and none replaces it within node_wait_s, go on with as few as"
                    " this many workers (same global batch: grad_accum grows). null: cluster.workers, never"
                    " shrink.")
    node_wait_s: NonNegativeFloat = Field(
        300, description="After a node is lost, how long to wait for room for the whole layout again before"
                         " shrinking to what is left (or failing).")


class LoggingConfig(_Section):
    """Where metrics go."""

    tensorboard: bool = Field(True, description="Write TensorBoard events to RUN/tensorboard.")
    jsonl: bool = Field(True, description="Write RUN/metrics.jsonl.")
    wandb: bool = Field(False, description="Log to Weights & Biases (pip install 'fm-train[wandb]', then `wandb"
                                           " login`); a restart or resume continues the same W&B run.")
    wandb_project: str = Field("fm-train", max_length=128, description="W&B project name when logging.wandb is on.")
    wandb_entity: Optional[str] = Field(None, max_length=128,
                                        description="W&B entity (team or user) of the run (null: your default).")
    wandb_tags: list[str] = Field(default_factory=list, max_length=64, description="W&B tags of the run.")
    wandb_mode: Literal["online", "offline"] = Field(
        "online", description="online, or offline: written under RUN/wandb only, for `wandb sync` later.")
    all_ranks: bool = Field(False, description="Stream every rank's log lines to the driver, not only rank 0.")
    loss_per_source: bool = Field(
        True, description="With several data sources, log the training loss of each (loss/NAME, next to"
                          " tokens_seen/NAME): from the loss head's per-token losses, or (families without a"
                          " fused head) one extra cross-entropy over the logits without gradient. Only where a"
                          " rank holds whole samples' losses (parallel.tp=1, pp=1, sp=1); other layouts log"
                          " tokens per source only.")


class FmConfig(_Section):
    """The whole run configuration; the top-level keys are the public contract."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: Precision = Field("bf16", description="bf16 | fp16 | fp32.")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    convert: ConvertConfig = Field(default_factory=ConvertConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def world_size(self) -> int:
        """Number of worker processes (``cluster.workers``)."""
        return self.cluster.workers

    @property
    def dp(self) -> int:
        """Data-parallel size, derived as ``workers / (tp * pp)``."""
        return self.cluster.workers // (self.parallel.tp * self.parallel.pp)

    @property
    def data_parallel(self) -> int:
        """Micro-batches read side by side: ``dp / sp`` (the sp ranks of a group share their samples)."""
        return max(1, self.dp // self.parallel.sp)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: ``micro_batch * grad_accum * dp / sp``."""
        return self.train.micro_batch * self.train.grad_accum * self.data_parallel

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed per optimizer step."""
        return self.global_batch * self.data.seq_len

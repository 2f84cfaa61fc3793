"""fm-train's one adapter around DeepSpeed: the only package that imports ``deepspeed``.

Everything fm-train does with DeepSpeed below its documented surface lives here, next to the check
that it still holds (STYLE 14): a version check at import (:mod:`.version`, the range the project
pins) and a check that every DeepSpeed method fm-train overrides or reaches into still exists
(:mod:`.overrides`), so that an upgrade fails loudly at import rather than turning an override into
a silent no-op. The rest of fm-train calls the small typed functions of these modules:

- :mod:`.comm`: joining the process group through DeepSpeed, its accelerator's name;
- :mod:`.engine`: ``deepspeed.initialize`` and the engine types, the checkpoint-engine swap;
- :mod:`.zero3`: building under ``zero.Init`` without its broadcast, ZeRO-3 partitions, master weights;
- :mod:`.grad_norm`: the pre-clip gradient norm of every engine;
- :mod:`.pipeline`: ``PipelineModule`` glue (layer specs, stage balancing, the pipeline probe forward);
- :mod:`.optimizer_state`: writing resharded fp32 weights and Adam moments into a live engine;
- :mod:`.files`: DeepSpeed's record classes its checkpoint pickles may hold;
- :mod:`.optimizer_names`: the optimizer's state names (Adam's moments), taken from torch's Adam.

DeepSpeed's checkpoint format, read without importing ``deepspeed`` (fm-train's own reader, for
resharding and conversion): :mod:`.ckpt_files` (opening one file, ``weights_only``), :mod:`.ckpt_ranks`
(one model-parallel rank's tensors per ZeRO stage), :mod:`.ckpt_names` (DeepSpeed names to fm_train
names), :mod:`.ckpt_reader` (a step directory's full tensors), :mod:`.ckpt_engine` (the guarded
checkpoint engine DeepSpeed's own saves and loads go through).

This ``__init__`` imports nothing, so that fm-train's own checkpoint readers can use the pure
modules (:mod:`.optimizer_names`) without paying for ``import deepspeed``; each module that imports
``deepspeed`` imports :mod:`.version` first (a test checks both rules).
"""

"""How tensor parallelism splits the MoE decoder, by module name.

Attention and the dense MLPs split as the Llama family's (q/k/v/gate/up column-parallel, o/down
row-parallel, the embedding vocab-parallel, the head column-parallel over the vocabulary). The router
and the experts stay whole on every tensor-parallel rank: expert parallelism, not tensor
parallelism, is what divides the experts (``parallel.ep``), and a routed block's input and output are
complete on each rank, like a norm's. So only ``self_attn`` is a region (its q/k/v share one entry into
the tp region); a routed ``mlp`` must not be one, or its input's gradient, already whole on each
rank, would be summed over the tp ranks. The dense MLPs' column-parallel linears enter the region
each on their own. The per-head q/k norms stay whole, but each rank normalises only its own heads
with them, so their gradients are summed over the tp ranks.
"""

from fm_train.parallel.tp_plan import TPPlan

TP_PLAN = TPPlan(
    modules={"q_proj": "column", "k_proj": "column", "v_proj": "column", "gate_proj": "column", "up_proj": "column",
             "o_proj": "row", "down_proj": "row", "embed_tokens": "vocab", "lm_head": "column"},
    regions=("self_attn",),
    summed_grads=("q_norm", "k_norm"),
)

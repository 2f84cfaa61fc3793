"""How tensor parallelism splits the Llama decoder (Megatron-style), by module name."""

from fm_train.parallel.tp_plan import TPPlan

#: Llama: q/k/v/gate/up column-parallel (q/k/v by whole heads, which the attention reads off the
#: projection shapes), o/down row-parallel, the embedding vocab-parallel, the head column-parallel over
#: the vocabulary (its local logits feed the vocab-parallel cross-entropy).
TP_PLAN = TPPlan(
    modules={"q_proj": "column", "k_proj": "column", "v_proj": "column", "gate_proj": "column", "up_proj": "column",
             "o_proj": "row", "down_proj": "row", "embed_tokens": "vocab", "lm_head": "column"},
    regions=("self_attn", "mlp"),
)

"""How tensor parallelism splits the BERT encoder (Megatron-style), by module name."""

from fm_train.parallel.tp_plan import TPPlan

#: BERT: query/key/value and the MLP's up projection column-parallel, the attention output and the
#: MLP's down projection row-parallel (their LayerNorms act on the reduced, replicated sum), the word
#: embeddings vocab-parallel and the tied decoder with its bias column-parallel over the vocabulary (the
#: decoder, an ``LMHead``, becomes a ``VocabParallelHead``: its input enters the tp region there, and
#: given labels it computes the vocab-parallel fused loss). Position and token-type embeddings,
#: LayerNorms and the prediction transform stay whole.
TP_PLAN = TPPlan(
    modules={"attention.self.query": "column", "attention.self.key": "column", "attention.self.value": "column",
             "attention.output.dense": "row", "intermediate.dense": "column", "output.dense": "row",
             "word_embeddings": "vocab", "predictions.decoder": "column"},
    params={"predictions.bias": 0},
    regions=("attention.self", "intermediate"),
)

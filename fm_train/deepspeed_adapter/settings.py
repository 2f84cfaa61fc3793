"""DeepSpeed settings fm-train chooses and the planner models (torch-free: the planner reads them)."""

#: Elements per ZeRO-3 optimizer sub-group: the ``sub_group_size`` DeepSpeed gets (its default is 1e9).
#: The step's temporaries are three fp32 copies of one sub-group (a parameter larger than it is a
#: sub-group of its own), so this bounds them to ~0.25 GB; DeepSpeed steps sub-groups one after
#: another, so smaller ones only add a Python loop (50 iterations for 1.1B parameters) to a step.
ZERO3_SUB_GROUP = 20_000_000

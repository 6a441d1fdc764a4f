"""Kept for the README's old name ``sgdet.fast``: the fast deployment stage now lives in
sgdet.deploy (optimize, plans, patterns, timing). Re-exports its public names only."""
from .deploy.optimize import (capture_inputs, drop_dead_channels, drop_outputs, fold_permutation,
                              optimize, ungather_batchnorm)
from .deploy.patterns import (CONV_BN_CONV_CHAINS, conv_bn_conv_chains, gathered_bn_pairs,
                              register_conv_bn_conv)
from .deploy.plans import (candidate_plans, choose_plan, dense_plan, estimate_cost, merge_groups,
                           plan_label, reorder_groups)
from .deploy.timing import time_interleaved

__all__ = [
    "CONV_BN_CONV_CHAINS", "candidate_plans", "capture_inputs", "choose_plan", "conv_bn_conv_chains",
    "dense_plan", "drop_dead_channels", "drop_outputs", "estimate_cost", "fold_permutation",
    "gathered_bn_pairs", "merge_groups", "optimize", "plan_label", "register_conv_bn_conv",
    "reorder_groups", "time_interleaved", "ungather_batchnorm",
]

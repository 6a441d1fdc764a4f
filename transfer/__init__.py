"""transfer: domain adaptation of compressed models to CUB-200-2011 (the paper's Table 5).

Stages: ``cub`` (the official CUB_200_2011/ layout; ``digits`` for the worked example) ->
``engine`` (load a compressed or dense ImageNet checkpoint, dense new head, masks and groups
kept, the classification Trainer) -> ``report`` (Table 5 as Markdown, JSON and a bar chart).
Verbs: ``python -m transfer finetune | eval | table | example``. Importing has no side effects."""

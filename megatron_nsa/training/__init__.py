"""Training NSA (or dense) GPT models with Megatron-Core: recipes, data, loop, checkpoints, metrics.

Entry point: `python -m megatron_nsa.training.train CONFIG.yaml [section.key=value ...]`.
"""

"""NSA in Megatron-LM's own training: `python -m megatron_nsa.megatron_lm.pretrain_gpt <Megatron-LM flags> --nsa-...`.

`arguments` holds the `--nsa-*` flags (generated from NSATransformerConfig's fields), the checks of
the Megatron-LM flags NSA layers cannot honour, and the NSA model spec; it needs megatron-core
only. `pretrain_gpt` is the entry point: it imports Megatron-LM's training package (a clone of
Megatron-LM at a release tag, its root on PYTHONPATH) and runs Megatron-LM's pretrain_gpt pieces
unchanged. The user guide is docs/megatron.md.
"""

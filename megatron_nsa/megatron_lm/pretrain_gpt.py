"""Megatron-LM's pretrain_gpt with NSA attention layers, configured by flags:

    torchrun --nproc-per-node 8 -m megatron_nsa.megatron_lm.pretrain_gpt <Megatron-LM flags> --nsa-...
    (or the console script megatron-nsa-pretrain-gpt)

Megatron-LM's own pieces run unchanged: its argument parser (with the `--nsa-*` flags added through
its extra-arguments hook), its datasets provider, forward step and loss (its `pretrain_gpt.py`),
and `pretrain`. What this adds: an NSATransformerConfig built from the flags and the NSA decoder
block as the model's layer spec. Needs Megatron-LM's training package: clone NVIDIA/Megatron-LM at
a release tag (core_v0.19.0 is the one tested) and put its root on PYTHONPATH.
"""
from __future__ import annotations

import re
import sys
import time

_PROGRAM_START_TIME = time.time()

from .arguments import add_nsa_arguments  # noqa: E402  (megatron-core only)

MEGATRON_LM_MISSING = (
    "megatron_nsa.megatron_lm.pretrain_gpt runs Megatron-LM's training (megatron.training and its "
    "pretrain_gpt.py), which could not be imported: {error}\n"
    "Get it with:  git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM.git  and put the "
    "clone's root on PYTHONPATH (export PYTHONPATH=/path/to/Megatron-LM:$PYTHONPATH)."
)


def import_megatron_lm():
    """Megatron-LM's pretrain_gpt module (its root's pretrain_gpt.py); a clear error when it is missing."""
    try:
        import megatron.training  # noqa: F401
        import pretrain_gpt as megatron_lm_pretrain_gpt
    except ImportError as error:
        raise SystemExit(MEGATRON_LM_MISSING.format(error=error)) from None
    needed = ("forward_step", "train_valid_test_datasets_provider", "get_embedding_ranks")
    missing = [name for name in needed if not hasattr(megatron_lm_pretrain_gpt, name)]
    if missing:
        raise SystemExit(MEGATRON_LM_MISSING.format(
            error=f"{megatron_lm_pretrain_gpt.__file__} is not Megatron-LM's pretrain_gpt.py (it lacks {missing})"))
    return megatron_lm_pretrain_gpt


def extra_arguments(parser):
    """Megatron-LM's extra-arguments hook: the `--nsa-*` flags, and every help text made printable
    (a lone '%' in one of Megatron-LM's own help strings breaks `--help`)."""
    add_nsa_arguments(parser)
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%%|%(?!\()", "%%", action.help)
    return parser


def main() -> None:
    megatron_lm = import_megatron_lm()
    from megatron.core.enums import ModelType
    from megatron.core.optimizer import distrib_optimizer
    from megatron.training import inprocess_restart, pretrain, print_rank_0, set_startup_timestamps
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args

    from ..compat import HAVE_TE
    from .arguments import NSAArgumentError, describe, nsa_block_spec_builder, nsa_transformer_config, \
        resolve_nsa_arguments

    set_startup_timestamps(program_start=_PROGRAM_START_TIME, main_entry=time.time())
    args = parse_and_validate_args(extra_args_provider=extra_arguments,
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    try:
        resolve_nsa_arguments(args, have_transformer_engine=HAVE_TE,
                              have_fused_adam=getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True))
        transformer_config = nsa_transformer_config(args, core_transformer_config_from_args)
    except NSAArgumentError as error:
        raise SystemExit(f"error: {error}") from None
    print_rank_0(f"> NSA attention: {describe(transformer_config)}")

    model_config = gpt_config_from_args(args, config=transformer_config)
    model_config.transformer_layer_spec = nsa_block_spec_builder(args)
    run_pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    datasets_provider = megatron_lm.train_valid_test_datasets_provider
    datasets_provider.is_distributed = True
    run_pretrain(pretrain_cfg_container_from_args(args, model_config), datasets_provider,
                 ModelType.encoder_or_decoder, megatron_lm.forward_step, store=store,
                 get_embedding_ranks=megatron_lm.get_embedding_ranks)


if __name__ == "__main__":
    sys.exit(main())

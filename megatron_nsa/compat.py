"""Everything that differs between the megatron-core versions we support (0.16 .. 0.19).

- 0.19 passes a `name=` keyword down the module tree (TransformerLayer -> attention -> linears);
  0.16 linears do not accept it.
- The layer-spec helpers we build on (`get_gpt_layer_local_spec`,
  `get_gpt_layer_with_transformer_engine_spec`) exist in both with the keywords used here.
- Transformer Engine is optional: detected here, used when present.
"""
from __future__ import annotations

from typing import Optional

from megatron.core import package_info
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

MCORE_VERSION = tuple(int(part) for part in package_info.__version__.split(".")[:2])

try:
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except ImportError:
    get_gpt_layer_with_transformer_engine_spec = None
    HAVE_TE = False


def module_name_kwargs(parent_name: Optional[str], child: str) -> dict:
    """The `name=` keyword for building a child module: only on versions that pass names (0.19+)."""
    return {} if parent_name is None else {"name": f"{parent_name}.{child}"}


def megatron_gpt_layer_spec(use_transformer_engine: bool, normalization: Optional[str] = None):
    """Megatron-Core's own GPT layer spec (dense MLP), the base that NSA replaces attention in."""
    if use_transformer_engine:
        if not HAVE_TE:
            raise ValueError(
                "use_transformer_engine=True but transformer-engine is not installed; "
                "pass use_transformer_engine=False (or None to detect) for local linears"
            )
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=normalization)

"""Constants of the kernels and of the tables they read, in one place.

The tl.constexpr ones are read inside @triton.jit functions (Triton lets a kernel read a module global
only when it is a constexpr); host code reads their `.value`.
"""
from __future__ import annotations

import os

import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2
INT32_MAX = tl.constexpr(2147483647)
INT64_MAX = tl.constexpr(9223372036854775807)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter runs the kernels

# Layouts built on the host are cached per layout, since every layer of a step shares one. Packed batches
# bring a new layout every step, so the caches keep only a few: layouts (tables with a row per token, about
# 24 bytes per token) in LAYOUT_CACHE_SIZE entries, tile tables (a row per tile, several block sizes per
# step) in TILE_CACHE_SIZE.
LAYOUT_CACHE_SIZE = 4
TILE_CACHE_SIZE = 32

# Selected dK/dV: each (KV head, block)'s list of query rows is cut into pieces of at most PIECE rows, one
# program each; a second pass sums the pieces in order.
PIECE = 512

# Rows per program of the element-wise kernels (gated combination, row_dot); the CPU interpreter pays per
# program, so it takes larger tiles.
COMBINE_ROWS = 256 if INTERPRETED else 16
ROW_DOT_ROWS = 512 if INTERPRETED else 32

# Narrowest column part of a Q / K row (a GPU dot's smallest inner dimension): kernels/qk_parts.py.
MIN_PART = 16

# Base address and row stride alignment of a tensor descriptor (kernels/tma.py).
ALIGN_BYTES = 16

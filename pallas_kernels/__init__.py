"""Pallas kernels for block-sparse decode attention."""

from pallas_kernels.backend import BlockSparseParams
from pallas_kernels.block_sparse_decode import block_sparse_decode, block_sparse_decode_reference

__all__ = ["BlockSparseParams", "block_sparse_decode", "block_sparse_decode_reference"]

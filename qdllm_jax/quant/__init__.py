"""Quantizers and the packed weight format.

Public API: `quantize_weight`, `quantize_weights_shared` (api.py) and `QuantizedWeight` (packed.py).
Solver entry points: `prepare_hessian`, `rtn_quantize`, `gptq_quantize`, `daq_quantize`, `daq_block`,
`block_salience`, `allocate_orders`, `allocate_orders_global`. The block-by-block model pipeline is in
`quant/pipeline.py`.
"""
from qdllm_jax.quant.abmp import allocate_orders, allocate_orders_global, block_salience
from qdllm_jax.quant.api import quantize_weight, quantize_weights_shared
from qdllm_jax.quant.daq import daq_block, daq_quantize
from qdllm_jax.quant.gptq import gptq_quantize
from qdllm_jax.quant.hessian import hessian_update, layer_loss, prepare_hessian, relative_sq_output_error
from qdllm_jax.quant.packed import LAYOUT_VERSION, QuantizedWeight
from qdllm_jax.quant.rtn import rtn_quantize

__all__ = [
    "quantize_weight", "quantize_weights_shared", "QuantizedWeight", "LAYOUT_VERSION", "prepare_hessian",
    "hessian_update", "layer_loss", "relative_sq_output_error", "rtn_quantize", "gptq_quantize", "daq_quantize",
    "daq_block", "block_salience", "allocate_orders", "allocate_orders_global",
]

"""Quantized checkpoints: save/load (Orbax + JSON sidecar), resumable pipeline state, exports and sizes.

    from qdllm_jax.checkpoint import load_quantized, save_quantized
    save_quantized(out, params, cfg, metadata={"rules": ..., "fingerprint": ...}, tokenizer_from=src)
    model = load_quantized(out, mesh=mesh)          # QuantizedWeight leaves, optionally sharded; checksums checked
    verify(out)                                      # checksums only (also `python -m qdllm_jax.checkpoint verify DIR`)
    export_hf(out, hf_dir, dtype="bfloat16")         # dequantized HF safetensors (load_pretrained, PyTorch)
    export_packed_safetensors(out, packed_dir)       # packed arrays as <hf name>.<field> + layout header
    save_state(dir, state, fingerprint=fp); load_state(dir, fp)   # resume quantize_model after any block
    state = spill(dir, state, fingerprint=fp)        # finished blocks stay on disk (SpilledBlock), load_block

Every write goes to a temporary sibling directory that is renamed into place (checkpoint/store.py).
"""
from qdllm_jax.checkpoint.export import export_hf, export_packed_safetensors, load_packed_safetensors
from qdllm_jax.checkpoint.quantized import (
           checkpoint_nbytes,
           load_quantized,
           read_sidecar,
           save_quantized,
           size_summary,
           verify,
)
from qdllm_jax.checkpoint.state import SpilledBlock, load_block, load_state, save_state, spill, spilling_hook

__all__ = ["save_quantized", "load_quantized", "read_sidecar", "checkpoint_nbytes", "size_summary", "save_state",
           "load_state", "spill", "spilling_hook", "load_block", "SpilledBlock", "export_hf",
           "export_packed_safetensors", "load_packed_safetensors", "verify"]

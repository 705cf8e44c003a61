"""Calibration data and passes: token windows, MCS masking, per-block Hessian capture.

    windows = make_windows(docs_or_stream, n=128, seqlen=4096, key=0)       # int32 [N, L]
    ids = calibration_inputs(windows, cfg)                                   # MCS-masked (Quant-dLLM §2)
    cap = capture_block(block_params, x, cfg, chunk_size=8)                  # H per linear group + outputs
"""
from qdllm_jax.calib.capture import Capture, block_outputs, capture_block
from qdllm_jax.calib.mcs import calibration_inputs, mcs_mask, mcs_timesteps
from qdllm_jax.calib.text_windows import (
                                     docs_to_stream,
                                     load_dataset_texts,
                                     make_windows,
                                     read_text_files,
                                     tokenize_documents,
                                     windows_from_texts,
)

__all__ = ["Capture", "block_outputs", "capture_block", "calibration_inputs", "mcs_mask", "mcs_timesteps",
           "docs_to_stream", "load_dataset_texts", "make_windows", "read_text_files", "tokenize_documents",
           "windows_from_texts"]

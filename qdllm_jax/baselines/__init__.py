"""Weight/activation PTQ baselines of the dLLM PTQ study (arXiv 2508.14896) on the params pytree of
`qdllm_jax.models.transformer` (fake quantization: every result is a dense params pytree).

  weight_activation: fake_quant_per_token, fake_quant_weights, forward_actquant (W8A8 / W4A4 forward with
               per-token activation quantizers and optional per-tap online transforms)
  smoothquant: collect_act_absmax, smooth_scales, smooth_params, smoothquant
  awq:         pseudo_quantize, scale_search, fold_scales, clip_search, awq
  quarot:      hadamard_matrix, rotation, fuse_norms, rotate_params, sequential_weights, data_free_weights, quarot
  duquant:     greedy_rotation, zigzag_permutation, duquant_transform, duquant
  weight_only: the study's RTN and GPTQ entries (the package's weight methods)
Each of awq, smoothquant, quarot, duquant and weight_only declares its study entry (`StudyMethod`,
study_method.py); study_registry.py lists them for study.py.
"""

"""Training of the tiny LLaDA: `objective` (LLaDA pretraining / SFT masked-diffusion losses) and `trainer`
(AdamW + warmup/cosine, jitted step, seeded data). `scripts/make_tiny_model.py` drives both."""

"""The training library: pure losses, model-facing objectives (GRPO, Diffusion-DPO), trained parts and
schedules, the DeepSpeed learner, the trainer skeleton every job shares, and SFT data. The jobs that use
them live in `jobs/`."""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)

"""Everything that changes or judges weights: losses, learner, jobs, checkpoints, config schema, CLI."""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)

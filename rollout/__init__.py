"""Everything that produces samples: prompt sources, rollout/reward workers, pools, preference datasets."""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)

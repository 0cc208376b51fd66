"""Everything that produces samples: prompt sources, the rollout batch and its seeds, rollout workers,
preference pairs and their dataset format, checkpoint evaluation and its result format. (Pools are
`core.pools`; the commands are `jobs/build_prefs.py` and `jobs/evaluate.py`.)"""

import base_model  # noqa: F401  (makes torchvision importable on CPU-only torch)

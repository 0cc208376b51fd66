"""NextStep-1 in PyTorch: config, backbone, flow head, VAE, sequences, sampler, checkpoint I/O.

Knows nothing of Ray, DeepSpeed or rewards. Import submodules directly (`base_model.model`, ...).
"""

from core.compat import patch_torchvision

patch_torchvision()  # makes torchvision importable on a CPU-only torch, before transformers imports it

"""The GRPO rollout worker on the receiving side of the weight sync (alignment/weight_sync.py): it joins the
weight group learner rank 0 broadcasts to, or (colocated, `weight_sync.transport: ipc`) takes each bucket
from the learner rank on its own GPU by handle. Its `policy_version` is -1 until it holds the learner's
policy: a replacement for a dead worker, or one whose receive failed part-way (alignment/grpo_learner.py
re-forms the group and sends again). Split from alignment/grpo_learner.py, the learner side.
"""

from __future__ import annotations

import gc

import torch

from alignment.weight_sync import GroupBroken, Slot, WeightGroup, check_layout, copy_into, open_bucket
from rollout.worker import GrpoRolloutWorker


class SyncedRolloutWorker(GrpoRolloutWorker):
    """A GRPO rollout worker that joins the weight group and takes each new policy from its broadcast."""

    weight_group: WeightGroup | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy_version = -1  # no policy from the learner yet (its model is not the learner's bf16 copy)
        self.hand_over_plan: list[list[Slot]] | None = None  # ipc: the buckets of a hand-over under way
        self.next_bucket = 0

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> int | None:
        """Drop the group this worker was in (if any), join the one at host:port; its rank, or None if the
        rendezvous failed (a member never came)."""
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = WeightGroup.connect(host, port, world_size, timeout_s)
        try:
            return self.weight_group.join(backend)
        except torch.distributed.DistError:
            self.weight_group.close()
            return None

    def start_hand_over(self, plan: list[list[Slot]]) -> bool:
        """Colocated ipc: the buckets to come, checked against this worker's model."""
        check_layout(plan, self.bundle.model.state_dict())
        self.hand_over_plan, self.next_bucket, self.policy_version = plan, 0, -1
        return True

    def take_bucket(self, version: int, index: int, handle: tuple) -> int | None:
        """Bucket `index` of policy `version` from the learner rank on this GPU, mapped by its handle and
        copied into the model in place; returns its bytes, or None if this worker missed an earlier bucket
        (a replacement that came mid-way). The last bucket makes `version` this worker's."""
        if self.hand_over_plan is None or index != self.next_bucket:
            return None
        flat = open_bucket(handle, self.device)
        copy_into(self.bundle.model.state_dict(), flat, self.hand_over_plan[index])
        if flat.is_cuda:  # copied before the rank refills its buffer
            torch.cuda.current_stream(flat.device).synchronize()
        self.next_bucket += 1
        if self.next_bucket == len(self.hand_over_plan):
            self.hand_over_plan, self.policy_version = None, version
        return flat.numel() * flat.element_size()

    def receive_weights(self, version: int) -> int | None:
        """The policy broadcast by learner rank 0, into this worker's model in place; returns the bytes, or
        None if the broadcast failed: the model is then part old, part new (version -1 until the next)."""
        if self.weight_group is None or self.weight_group.group is None:
            raise RuntimeError("receive_weights: this rollout worker is in no weight group")
        try:
            received = self.weight_group.receive(self.bundle.model.state_dict(), self.device)
        except GroupBroken:
            self.policy_version = -1
            return None
        self.policy_version = version
        return received

    def release_memory(self) -> int:
        """Between rollout and learning when colocated: the sampler's caches go back to the device."""
        return release_device_memory(self.device)


def release_device_memory(device: torch.device | str) -> int:
    """Collect garbage and return the CUDA caching allocator's free blocks to the device; returns the
    bytes this process still reserves there (0 off CUDA)."""
    gc.collect()
    if not str(device).startswith("cuda"):
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)

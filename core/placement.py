"""Ray placement groups: reserve every bundle of a group of actors at once, or fail in one line.

A pool of N workers (or a group of learner ranks) asks Ray for N bundles of resources together
(`reserve_placement`), then schedules actor i into bundle i (`in_bundle`). When the cluster can never
hold the request (its total, or its largest node, is too small) the answer is immediate; when the
resources exist but are held by someone else, the wait ends after `timeout_s`. Either way the caller
gets one ConfigError line naming the shortfall, e.g.
    10 workers x 1 GPU = 10 GPU requested, the Ray cluster has 8 GPU (it can never fit)
instead of actors that wait forever. Actors created in a reservation are then waited for
(`wait_started`): a constructor that raises surfaces as one line, a start that takes too long too.
Colocation: pools whose actor i must share one device reserve ONE group together (core.pools.
reserve_shared: bundle i holds the sum of every pool's per-actor resources) and each receives it as
`SharedBundles` (the group and the bundle index of each of its actors); whoever reserved it releases it,
once, after the pools are shut down. `here()`, run inside an actor, reports where Ray put it.
Ray must already be running here (core.ray_session.ensure_ray); Ray stays in core/.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError, UserError

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray's placement strategies


def amount(value: float) -> str:
    """1.0 -> '1', 0.5 -> '0.5': resource counts as a person writes them."""
    return f"{value:g}"


def nonzero(bundle: dict[str, float]) -> dict[str, float]:
    """The bundle without its zero entries (Ray refuses a bundle resource of 0)."""
    return {name: float(v) for name, v in bundle.items() if v > 0}


def totals(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    """Resource name -> the sum over all bundles."""
    summed: dict[str, float] = {}
    for bundle in bundles:
        for name, value in bundle.items():
            summed[name] = summed.get(name, 0.0) + value
    return summed


def fits_a_node(bundle: dict[str, float], nodes: Sequence[dict[str, float]]) -> bool:
    """Whether some node has every resource of `bundle`."""
    return any(all(node.get(name, 0.0) + 1e-9 >= value for name, value in bundle.items()) for node in nodes)


def never_fits(bundles: Sequence[dict[str, float]], strategy: str, nodes: Sequence[dict[str, float]]) -> str | None:
    """Why `bundles` can never be placed on a cluster of `nodes` (each node: resource -> total), or None:
    the first resource (GPU first) whose cluster total is too small, 'bundle' when some bundle fits no
    single node, 'one node' when STRICT_PACK's sum fits no node, 'nodes' when STRICT_SPREAD has more
    bundles than the cluster has nodes."""
    cluster = totals(nodes)
    for name, wanted in sorted(totals(bundles).items(), key=lambda kv: (kv[0] != "GPU", kv[0])):  # GPU first
        if wanted > cluster.get(name, 0.0) + 1e-9:
            return name
    if not all(fits_a_node(bundle, nodes) for bundle in bundles):
        return "bundle"
    if strategy == "STRICT_PACK" and not fits_a_node(totals(bundles), nodes):
        return "one node"
    if strategy == "STRICT_SPREAD" and len(bundles) > len(nodes):
        return "nodes"
    return None


def describe(bundles: Sequence[dict[str, float]], what: str, have: dict[str, float], short: str | None) -> str:
    """'10 workers x 1 GPU = 10 GPU requested, the Ray cluster has 8 GPU' for the resource `short`
    (None: every resource requested); bundles that differ are given by their total only."""
    wanted = totals(bundles)
    names = [short] if short in wanted else sorted(wanted, key=lambda n: (n != "GPU", n))
    same = all(b == bundles[0] for b in bundles)
    per = " + ".join(f"{amount(bundles[0].get(n, 0.0))} {n}" for n in names)
    total = " + ".join(f"{amount(wanted[n])} {n}" for n in names)
    held = " + ".join(f"{amount(have.get(n, 0.0))} {n}" for n in names)
    head = f"{len(bundles)} {what} x {per} = {total}" if same else f"{len(bundles)} {what} = {total}"
    return f"{head} requested, the Ray cluster has {held}"


def _node_resources() -> list[dict[str, float]]:
    """Resource totals of every live node of the cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def reserve_placement(
    bundles: list[dict[str, float]], strategy: str = "PACK", timeout_s: float = 300.0, what: str = "workers"
) -> Any:
    """A ready `ray.util.placement_group.PlacementGroup` holding `bundles` (one per actor).

    `what` names the actors in the error line ('workers', 'learner ranks'). Raises one
    ConfigError when the cluster can never hold the group (at once) or the group is not placed within
    `timeout_s` (the resources are held elsewhere); the unplaced group is removed first."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if strategy not in STRATEGIES:
        raise ConfigError(f"{what}: placement strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    wanted = [nonzero(b) for b in bundles]
    if not wanted or any(not b for b in wanted):
        raise ConfigError(f"{what}: every placement bundle needs some CPU or GPU, got {bundles}")
    nodes = _node_resources()
    short = never_fits(wanted, strategy, nodes)
    if short is not None:
        reason = {
            "bundle": "no single node holds one bundle",
            "one node": "no single node holds them all, as STRICT_PACK needs",
            "nodes": f"STRICT_SPREAD needs {len(wanted)} nodes, the cluster has {len(nodes)}",
        }.get(short, "it can never fit")
        raise ConfigError(f"{describe(wanted, what, totals(nodes), short)} ({reason})")
    group = placement_group(wanted, strategy=strategy)
    placed, _ = ray.wait([group.ready()], timeout=timeout_s)  # (group.wait rounds the timeout to seconds)
    if placed:
        return group
    remove_placement_group(group)
    free = ray.available_resources()
    short_now = next((n for n, v in totals(wanted).items() if v > free.get(n, 0.0) + 1e-9), None)
    line = describe(wanted, what, totals(nodes), short_now)
    held = f"{amount(free.get(short_now, 0.0))} {short_now} free" if short_now else "too fragmented"
    raise ConfigError(f"{line} ({held}; timed out after {amount(timeout_s)} s waiting for a placement group)")


@dataclass(frozen=True)
class SharedBundles:
    """Bundles of a placement group that someone else reserved and releases: a pool's actor i goes to
    bundle `indices[i]` of `group`, and the pool leaves the group in place when it shuts down."""

    group: Any  # ray.util.placement_group.PlacementGroup
    indices: tuple[int, ...]

    def release(self) -> None:
        """For the one who reserved it, after every pool in it is shut down."""
        release_placement(self.group)


@dataclass(frozen=True)
class ActorPlacement:
    """Where Ray runs an actor: its placement group (hex id), bundle, node and the GPUs it sees."""

    group_id: str | None  # None: outside any placement group
    bundle_index: int | None
    node_id: str
    gpu_ids: tuple[str, ...]  # Ray's GPU ids (CUDA_VISIBLE_DEVICES); () on a CPU


def bundle_index_of(resource_names: Sequence[str], group_id: str) -> int | None:
    """The bundle index in Ray's placement-group resource names ('CPU_group_1_<id>' -> 1; the
    index-free 'CPU_group_<id>' names the whole group), None when no name carries one."""
    pattern = re.compile(rf"^\w+?_group_(\d+)_{re.escape(group_id)}$")
    found = {int(m.group(1)) for name in resource_names if (m := pattern.match(name))}
    return found.pop() if len(found) == 1 else None


def unpaired(first: Sequence[ActorPlacement], second: Sequence[ActorPlacement]) -> list[int]:
    """The indices i where actor i of `first` and actor i of `second` do not share one bundle of one group
    on one node with the same GPUs (colocation that did not happen)."""
    return [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a.group_id is None or a != b]


def here() -> ActorPlacement:
    """Inside an actor: where it runs (read from the resources Ray assigned it)."""
    import ray

    context = ray.get_runtime_context()
    group_id = context.get_placement_group_id()
    # the bundle index is only in the per-bundle resource names Ray assigned (the public API merges them)
    names = list(ray._private.worker.global_worker.core_worker.resource_ids()) if group_id else []
    gpus = tuple(str(g) for g in context.get_accelerator_ids().get("GPU", []))
    return ActorPlacement(group_id, bundle_index_of(names, group_id) if group_id else None, context.get_node_id(), gpus)


def in_bundle(group: Any, index: int) -> Any:
    """The scheduling strategy that puts an actor (`.options(scheduling_strategy=...)`) in bundle `index`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index)


class StartError(RuntimeError):
    """An actor whose constructor raised something other than a UserError (a bug: its last line shown)."""


def start_error(error: Exception, where: str, index: int) -> Exception:
    """The one-line error for actor `index` whose constructor failed with Ray's `error`: the user's own
    UserError (e.g. a corrupt checkpoint) raised again as itself, anything else as a StartError."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    path, _, message = last.partition(": ")
    owner, _, name = path.rpartition(".")
    cls = getattr(sys.modules.get(owner), name, None) if owner else None
    if isinstance(cls, type) and issubclass(cls, UserError):
        return cls(message)
    return StartError(f"{where}: worker {index} failed to start: {last}")


def wait_started(actors: Sequence[Any], where: str, timeout_s: float, hint: str = "") -> None:
    """Wait until every actor has run its constructor (a no-op call answered), at most `timeout_s`.

    A constructor that raised ends the wait at once with its one-line error (`start_error`); actors
    still starting at the deadline give one ConfigError ending with `hint` (what to raise); `where`
    (e.g. the pool's config key) starts both lines."""
    import ray
    from ray.exceptions import RayActorError

    pending = {actor.__ray_ready__.remote(): i for i, actor in enumerate(actors)}
    deadline = time.monotonic() + timeout_s
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ConfigError(
                f"{where}: {len(pending)} of {len(actors)} workers not started after {amount(timeout_s)} s{hint}"
            )
        index = pending.pop(done[0])
        try:
            ray.get(done[0])
        except RayActorError as error:
            raise start_error(error, where, index) from None


def release_placement(group: Any) -> None:
    """Remove a placement group (its actors go with it); nothing when Ray is already down."""
    import ray
    from ray.util.placement_group import remove_placement_group

    if group is not None and ray.is_initialized():
        remove_placement_group(group)

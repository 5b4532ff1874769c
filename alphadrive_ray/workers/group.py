"""The one place that turns worker classes into Ray actors.

`spawn` reserves a placement group (one bundle per actor, so an autoscaler sees the whole
demand at once), waits for it with progress messages, and starts the actors in it. The
three groups the driver talks to wrap lists of actors with the calls the driver needs:
`RolloutGroup` (whole prompts to each worker, weight loading), `RewardPool` (whole groups,
with a timeout) and `LearnerGroup` (equal shards to each rank).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Group, SamplingParams
from alphadrive_ray.errors import UserError


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0

    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus}
        if self.gpus:
            bundle["GPU"] = self.gpus
        return bundle


def wait_for_placement(pg, what: str, timeout_s: float = 1800.0, log=print) -> None:
    """Block until the placement group is placed, telling the user what it waits for."""
    start = time.monotonic()
    next_note = 10.0
    while True:
        ready, _ = ray.wait([pg.ready()], timeout=5.0)
        if ready:
            return
        waited = time.monotonic() - start
        if waited > timeout_s:
            remove_placement_group(pg)
            raise UserError(
                f"gave up after {waited:.0f}s waiting for resources for {what}: {pg.bundle_specs} "
                f"(cluster has {ray.cluster_resources()}). Lower the worker counts or per-worker "
                f"resources in the config, or add nodes."
            )
        if waited >= next_note:
            log(f"waiting {waited:.0f}s for resources for {what}: {pg.bundle_specs} (an autoscaler may be adding nodes)")
            next_note *= 2


def spawn(
    cls: type,
    args_per_actor: Sequence[tuple],
    resources: Resources,
    *,
    name: str,
    strategy: str = "PACK",
    max_restarts: int = 0,
    env: dict[str, str] | None = None,
) -> tuple[list[Any], Any]:
    """Start one actor of `cls` per argument tuple, each in its own placement-group bundle."""
    n = len(args_per_actor)
    pg = placement_group([resources.bundle() for _ in range(n)], strategy=strategy, name=_pg_name(name))
    wait_for_placement(pg, f"{n} {name} worker(s)")
    remote_cls = ray.remote(cls)
    actors = []
    for i, args in enumerate(args_per_actor):
        options = dict(
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            name=None,
            max_restarts=max_restarts,
            max_task_retries=0,
        )
        if env:
            options["runtime_env"] = {"env_vars": env}
        actors.append(remote_cls.options(**options).remote(*args))
    return actors, pg


def _pg_name(role: str) -> str:
    """Placement-group names are unique per cluster; the suffix tells runs apart in the dashboard."""
    return f"alphadrive-{role}-{uuid.uuid4().hex[:8]}"


@ray.remote(num_cpus=0)
def _free_address() -> tuple[str, int]:
    """The node address and a free TCP port, found on the node that will host rank 0."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def split_evenly(items: Sequence, parts: int) -> list[Sequence]:
    """Contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


class RolloutGroup:
    def __init__(self, actors: list, pg=None):
        self.actors = actors
        self.pg = pg

    @classmethod
    def start(cls, spec, n: int, resources: Resources) -> "RolloutGroup":
        from alphadrive_ray.workers.rollout import RolloutWorker

        actors, pg = spawn(RolloutWorker, [(spec, i) for i in range(n)], resources, name="rollout")
        ray.get([a.ping.remote() for a in actors])
        return cls(actors, pg)

    def generate_refs(self, records: Sequence[Record], params: SamplingParams) -> list:
        """One object ref per worker, each a list of whole groups; prompts split evenly."""
        refs = []
        for i, (actor, chunk) in enumerate(zip(self.actors, split_evenly(records, len(self.actors)))):
            if len(chunk):
                # distinct seeds per worker, so their samples differ
                refs.append(actor.generate.remote(list(chunk), SamplingParams(**{**params.__dict__, "seed": params.seed * 1009 + i})))
        return refs

    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        return [g for part in ray.get(self.generate_refs(records, params)) for g in part]

    def load_weights(self, bucket_refs: list, version: int) -> list[int]:
        return ray.get([a.load_weights.remote(bucket_refs, version) for a in self.actors])


class RewardPool:
    def __init__(self, actors: list, timeout_s: float, pg=None):
        self.actors = actors
        self.timeout_s = timeout_s
        self.pg = pg

    @classmethod
    def start(cls, spec, n: int, resources: Resources, timeout_s: float) -> "RewardPool":
        from alphadrive_ray.workers.reward import RewardWorker

        actors, pg = spawn(RewardWorker, [(spec, i) for i in range(n)], resources, name="reward")
        ray.get([a.ping.remote() for a in actors])
        return cls(actors, timeout_s, pg)

    def score_refs(self, group_refs: list) -> list:
        """Score each generation result (a list of groups) on a worker, round robin."""
        return [self.actors[i % len(self.actors)].score.remote(ref) for i, ref in enumerate(group_refs)]

    def gather(self, score_refs: list) -> list[list[dict[str, float]]]:
        try:
            parts = ray.get(score_refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"reward scoring took longer than reward.timeout_s = {self.timeout_s}s; a reward function may be "
                f"hanging. Raise reward.timeout_s if the batch is just large."
            ) from None
        return [scores for part in parts for scores in part]

    def score(self, groups: Sequence[Group]) -> list[list[dict[str, float]]]:
        chunks = [c for c in split_evenly(list(groups), len(self.actors)) if len(c)]
        return self.gather([self.actors[i].score.remote(list(c)) for i, c in enumerate(chunks)])


class LearnerGroup:
    def __init__(self, actors: list, pg=None):
        self.actors = actors
        self.pg = pg

    @classmethod
    def start(cls, spec, n: int, resources: Resources) -> "LearnerGroup":
        from alphadrive_ray.workers.learner import LearnerWorker

        # Reserve the bundles first so that rank 0's address is on the node that hosts it.
        pg = placement_group([resources.bundle() for _ in range(n)], strategy="PACK", name=_pg_name("learner"))
        wait_for_placement(pg, f"{n} learner worker(s)")
        addr, port = ray.get(
            _free_address.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote()
        )
        remote_cls = ray.remote(LearnerWorker)
        actors = [
            remote_cls.options(
                num_cpus=resources.cpus,
                num_gpus=resources.gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(spec, rank, n, addr, port)
            for rank in range(n)
        ]
        ray.get([a.ping.remote() for a in actors])
        return cls(actors, pg)

    def _all(self, method: str, *args, **kwargs) -> list:
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def _sharded(self, method: str, items: Sequence, *args, **kwargs) -> list:
        shards = split_evenly(list(items), len(self.actors))
        if len({len(s) for s in shards}) != 1:
            raise ValueError(f"{len(items)} items do not split evenly over {len(self.actors)} learners")
        return ray.get([getattr(a, method).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards)])

    def begin_stage(self, stage: str, beta: float = 0.0) -> None:
        self._all("begin_stage", stage, beta)

    def sft_step(self, examples: Sequence, micro_batch_size: int, lr: float) -> dict:
        return self._sharded("sft_step", examples, micro_batch_size, lr)[0]

    def grpo_step(self, samples: Sequence, micro_batch_size: int, lr: float, **kwargs) -> dict:
        return self._sharded("grpo_step", samples, micro_batch_size, lr, **kwargs)[0]

    def export_weights(self, bucket_mb: int) -> list:
        return self._all("export_weights", bucket_mb)[0]

    def save_hf(self, out_dir: str) -> str:
        return self._all("save_hf", out_dir)[0]

    def state_dict_cpu(self, rank: int = 0) -> dict:
        # every rank takes part (ZeRO-3 gathers are collectives); one answers
        return self._all("state_dict_cpu")[rank]

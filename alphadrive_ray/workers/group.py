"""The one place that turns worker classes into Ray actors.

`spawn` reserves a placement group (one bundle per actor, so an autoscaler sees the whole
demand at once), waits for it with progress messages, and starts the actors in it. The
three groups the driver talks to wrap lists of actors with the calls the driver needs:
`RolloutGroup` (whole prompts to each worker, weight loading), `RewardPool` (whole groups,
with a timeout) and `LearnerGroup` (equal shards to each rank).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alphadrive_ray.data.records import Record
from alphadrive_ray.engines.base import Group, SamplingParams
from alphadrive_ray.errors import RunAborted, UserError

if TYPE_CHECKING:
    from ray.actor import ActorClass


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
    group_name = _pg_name(name)
    pg = placement_group([resources.bundle() for _ in range(n)], strategy=strategy, name=group_name)
    wait_for_placement(pg, f"{n} {name} worker(s)")
    remote_cls: ActorClass[Any] = ray.remote(cls)
    actors = []
    for i, args in enumerate(args_per_actor):
        options = dict(
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            name=f"{group_name}-{i}",  # named, so the dashboard and operators can find each worker
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


class _ActorGroup:
    actors: list
    pg: Any

    def shutdown(self) -> None:
        """Stop the actors and give their reserved resources back."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def split_evenly(items: Sequence, parts: int) -> list[Sequence]:
    """Contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


@dataclass
class Job:
    """One worker's share of a generation round: whole prompts, and where their scores go."""

    rollout: Any  # actor handle
    records: list
    params: SamplingParams
    gen_ref: Any
    reward: Any = None  # actor handle
    score_ref: Any = None
    version: int = 0  # the weight version the engines held when the job was submitted


def _dead(exc: BaseException) -> bool:
    """True when a call failed because its actor (or an actor it depended on) died."""
    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)) or (
        isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, ray.exceptions.RayActorError)
    )


def wait_alive(actor, timeout_s: float = 300.0) -> None:
    """Block until a (restarting) actor answers again; Ray re-runs its constructor first."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except Exception as exc:  # noqa: BLE001
            if not _dead(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def nccl_sync_layout(engines: int, tensor_parallel_size: int = 1) -> tuple[int, list[int]]:
    """The NCCL weight-sync group: (world size, each engine's first rank). Learner rank 0 is
    rank 0; engine i's vLLM workers (one per tensor-parallel shard) are ranks
    1 + i * tp ... i * tp + tp, each at its engine's first rank + its own TP rank."""
    if engines < 1 or tensor_parallel_size < 1:
        raise ValueError(f"need at least one engine and tensor_parallel_size >= 1; got {engines}, {tensor_parallel_size}")
    return 1 + engines * tensor_parallel_size, [1 + i * tensor_parallel_size for i in range(engines)]


class RolloutGroup(_ActorGroup):
    def __init__(self, actors: list, pg=None, max_retries: int = 3, tensor_parallel_size: int = 1):
        self.actors = actors
        self.pg = pg
        self.max_retries = max_retries
        self.tensor_parallel_size = tensor_parallel_size  # vLLM workers per engine (NCCL ranks)
        # the object-store buckets of the last sync, which a restarted worker loads again
        self.bucket_refs: list | None = None
        self.version = 0  # of the last sync (0: the weights the engines started with)
        # broadcast sync (sync.backend nccl / gloo): the learners that send, the backend, and
        # whether the group's members are all joined (a restarted worker is not)
        self._broadcast: tuple[LearnerGroup, str] | None = None
        self._group_open = False
        self.restarts = 0
        self.last_wait = {"rollout": 0.0, "reward": 0.0}

    @classmethod
    def start(cls, spec, n: int, resources: Resources, max_restarts: int = 3, placement: str = "PACK") -> "RolloutGroup":
        from alphadrive_ray.workers.rollout import RolloutWorker

        actors, pg = spawn(RolloutWorker, [(spec, i) for i in range(n)], resources, name="rollout", strategy=placement, max_restarts=max_restarts)
        ray.get([a.ping.remote() for a in actors])
        return cls(actors, pg, max_retries=max_restarts, tensor_parallel_size=spec.tensor_parallel_size)

    def submit(self, records: Sequence[Record], params: SamplingParams, rewards: "RewardPool | None" = None) -> list[Job]:
        """Start generation (and scoring) of whole prompts, split evenly over the workers."""
        jobs: list[Job] = []
        for i, (actor, chunk) in enumerate(zip(self.actors, split_evenly(records, len(self.actors)))):
            if not len(chunk):
                continue
            # distinct seeds per worker, so their samples differ
            worker_params = SamplingParams(**{**params.__dict__, "seed": params.seed * 1009 + i})
            job = Job(actor, list(chunk), worker_params, actor.generate.remote(list(chunk), worker_params), version=self.version)
            if rewards is not None:
                job.reward = rewards.actors[len(jobs) % len(rewards.actors)]
                job.score_ref = job.reward.score.remote(job.gen_ref)
            jobs.append(job)
        return jobs

    def collect(self, jobs: list[Job], rewards: "RewardPool | None" = None) -> tuple[list[Group], list]:
        """Results of submitted jobs, in order. A worker that died is restarted by Ray; its
        share is generated again (after it reloads the current weights) or scored again."""
        groups: list[Group] = []
        scores: list = []
        # seconds the driver waited for generation, then for the scores that follow it
        self.last_wait = {"rollout": 0.0, "reward": 0.0}
        for job in jobs:
            for attempt in range(self.max_retries + 1):
                t0 = time.monotonic()
                try:
                    part = ray.get(job.gen_ref)
                except Exception as exc:  # noqa: BLE001 - only dead actors are retried
                    if not _dead(exc) or attempt == self.max_retries:
                        raise
                    self._redo_generation(job, rewards)
                    continue
                t1 = time.monotonic()
                self.last_wait["rollout"] += t1 - t0
                if any(c.weight_version < job.version for g in part for c in g.completions):
                    # the worker died between calls and Ray restarted it: it generated with the
                    # weights it started with, and its scores (if any) are of those completions
                    if attempt == self.max_retries:
                        raise RuntimeError(f"rollout worker generated with weight version < {job.version} after {attempt + 1} attempts")
                    self._redo_generation(job, rewards)
                    continue
                if job.score_ref is None:
                    break
                assert rewards is not None  # a job is scored only when it was submitted with rewards
                try:
                    part_scores = rewards.gather([job.score_ref])
                    self.last_wait["reward"] += time.monotonic() - t1
                except Exception as exc:  # noqa: BLE001
                    if not _dead(exc) or attempt == self.max_retries:
                        raise
                    rewards.restarts += 1
                    wait_alive(job.reward)
                    job.score_ref = job.reward.score.remote(job.gen_ref)
                    continue
                scores += part_scores
                break
            groups += part
        return groups, scores

    def _redo_generation(self, job: Job, rewards: "RewardPool | None") -> None:
        self.restarts += 1
        wait_alive(job.rollout)
        if self._broadcast is not None:
            if self.version > 0:
                # the restarted worker left the group: every member joins a new one, then the
                # current weights go out again (the others receive what they hold)
                self.broadcast_weights(self.version, rejoin=True)
        elif self.bucket_refs is not None:
            job.rollout.load_weights.remote(self.bucket_refs, self.version)  # runs first on the restarted actor
        job.gen_ref = job.rollout.generate.remote(job.records, job.params)
        if job.reward is not None:
            job.score_ref = job.reward.score.remote(job.gen_ref)

    def generate(self, records: Sequence[Record], params: SamplingParams) -> list[Group]:
        return self.collect(self.submit(records, params))[0]

    def load_weights(self, bucket_refs: list, version: int) -> list[int]:
        self.bucket_refs = bucket_refs
        self.version = version
        out = []
        for actor in self.actors:
            for attempt in range(self.max_retries + 1):
                try:
                    out.append(ray.get(actor.load_weights.remote(bucket_refs, version)))
                    break
                except Exception as exc:  # noqa: BLE001
                    if not _dead(exc) or attempt == self.max_retries:
                        raise
                    self.restarts += 1
                    wait_alive(actor)
        return out

    def verify_weights(self, learners: "LearnerGroup", version: int) -> int:
        """`sync.verify`: every engine must hold learner rank 0's synced tensors bit for bit
        (`weight_sync.tensor_digest`, the learner's cast to the engine's dtype). Returns how many
        tensors each engine was checked on; raises RunAborted naming the first that differ."""
        from alphadrive_ray.weight_sync import digest_dtype, digest_mismatches

        held = ray.get([actor.weight_digests.remote() for actor in self.actors])
        sent = learners.weight_digests({name: digest_dtype(d) for name, d in held[0].items()})
        for index, engine in enumerate(held):
            wrong = digest_mismatches(sent, engine)
            if wrong:
                raise RunAborted(
                    f"sync.verify: after weight sync {version}, rollout worker {index} differs from learner rank 0 in "
                    f"{len(wrong)} of {len(sent)} synced tensors (first: {', '.join(wrong[:3])})"
                )
        return len(sent)

    def use_broadcast(self, learners: "LearnerGroup", backend: str) -> None:
        """Sync by broadcast from learner rank 0 (`sync.backend` nccl on GPUs, gloo on CPU) instead
        of through the object store; the group is opened at the first `broadcast_weights`."""
        self._broadcast = (learners, backend)
        self._group_open = False

    def broadcast_weights(self, version: int, rejoin: bool = False) -> int:
        """Learner rank 0 -> every engine; returns the bytes sent. A worker that Ray restarted
        since the last sync (it answers with an older weight version, or died and is waited
        for) lost its group membership: the group is re-formed with every member first, as it
        is with `rejoin` (the caller already knows of a restart)."""
        assert self._broadcast is not None, "use_broadcast first"
        learners, backend = self._broadcast
        if rejoin or self._restarted_since_sync():
            self._group_open = False
        if not self._group_open:
            learners.open_broadcast_sync(self, backend)
            self._group_open = True
        n = learners.broadcast_weights(self, version)
        self.version = version
        return n

    def _restarted_since_sync(self) -> bool:
        refs = [a.weight_version.remote() for a in self.actors]
        restarted = False
        for actor, ref in zip(self.actors, refs):
            try:
                held = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - only dead actors are waited for
                if not _dead(exc):
                    raise
                wait_alive(actor)
                held = -1
            if held != self.version:
                self.restarts += 1
                restarted = True
        return restarted


class RewardPool(_ActorGroup):
    def __init__(self, actors: list, timeout_s: float, pg=None):
        self.actors = actors
        self.timeout_s = timeout_s
        self.pg = pg
        self.restarts = 0

    @classmethod
    def start(cls, spec, n: int, resources: Resources, timeout_s: float, max_restarts: int = 3, placement: str = "PACK") -> "RewardPool":
        from alphadrive_ray.workers.reward import RewardWorker

        actors, pg = spawn(RewardWorker, [(spec, i) for i in range(n)], resources, name="reward", strategy=placement, max_restarts=max_restarts)
        ray.get([a.ping.remote() for a in actors])
        return cls(actors, timeout_s, pg)

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


class LearnerGroup(_ActorGroup):
    def __init__(self, actors: list, pg=None):
        self.actors = actors
        self.pg = pg

    @classmethod
    def start(cls, spec, n: int, resources: Resources, placement: str = "PACK") -> "LearnerGroup":
        from alphadrive_ray.workers.learner import LearnerWorker

        # Reserve the bundles first so that rank 0's address is on the node that hosts it.
        group_name = _pg_name("learner")
        pg = placement_group([resources.bundle() for _ in range(n)], strategy=placement, name=group_name)
        wait_for_placement(pg, f"{n} learner worker(s)")
        addr, port = ray.get(_free_address.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote())
        remote_cls = ray.remote(LearnerWorker)
        # actor handles: their methods are called through `.remote`, which Ray's types do not describe
        actors: list[Any] = [
            remote_cls.options(
                num_cpus=resources.cpus,
                num_gpus=resources.gpus,
                name=f"{group_name}-{rank}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(spec, rank, n, addr, port)
            for rank in range(n)
        ]
        ray.get([a.ping.remote() for a in actors])
        return cls(actors, pg)

    def _get(self, refs: list, method: str) -> list:
        try:
            return ray.get(refs)
        except Exception as exc:  # noqa: BLE001
            if _dead(exc):
                # NOTE: a learner cannot be replaced mid-run: its optimizer shard and its place in
                # the process group die with it. Stop; the last checkpoint resumes the run.
                raise RunAborted(f"a learner worker died during `{method}` ({type(exc).__name__}): {str(exc).splitlines()[0]}") from None
            raise

    def _all(self, method: str, *args, **kwargs) -> list:
        return self._get([getattr(a, method).remote(*args, **kwargs) for a in self.actors], method)

    def _sharded(self, method: str, items: Sequence, *args, **kwargs) -> list:
        shards = split_evenly(list(items), len(self.actors))
        if len({len(s) for s in shards}) != 1:
            raise ValueError(f"{len(items)} items do not split evenly over {len(self.actors)} learners")
        return self._get([getattr(a, method).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards)], method)

    def begin_stage(self, stage: str, beta: float = 0.0, reference_path: str | None = None, weight_decay: float = 0.0) -> None:
        self._all("begin_stage", stage, beta, reference_path, weight_decay)

    def save_state(self, path: str, client_state: dict) -> None:
        self._all("save_state", path, client_state)

    def load_state(self, path: str) -> dict:
        return self._all("load_state", path)[0]

    def sft_step(self, examples: Sequence, micro_batch_size: int, lr: float) -> dict:
        return self._sharded("sft_step", examples, micro_batch_size, lr)[0]

    def grpo_step(self, samples: Sequence, micro_batch_size: int, lr: float, **kwargs) -> dict:
        return self._sharded("grpo_step", samples, micro_batch_size, lr, **kwargs)[0]

    def export_weights(self, bucket_mb: int) -> list:
        return self._all("export_weights", bucket_mb)[0]

    def open_broadcast_sync(self, rollout: "RolloutGroup", backend: str) -> None:
        """A fresh broadcast group (nccl or gloo, at a fresh port) of learner rank 0 (rank 0) and
        every engine worker (`nccl_sync_layout`); members leave the group they were in."""
        addr, port = ray.get(
            _free_address.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)).remote()
        )
        world, offsets = nccl_sync_layout(len(rollout.actors), rollout.tensor_parallel_size)
        sender = self.actors[0].open_weight_sync_group.remote(addr, port, world, backend)
        ray.get([a.init_weight_sync_group.remote(addr, port, offset, world) for a, offset in zip(rollout.actors, offsets)])
        self._get([sender], "open_weight_sync_group")

    def broadcast_weights(self, rollout: "RolloutGroup", version: int) -> int:
        """Stream the weights from rank 0 to every engine of an open broadcast group (engines
        receive concurrently). Returns the bytes sent."""
        from alphadrive_ray.weight_sync import to_dtype

        metas = ray.get(self.actors[0].weight_metas.remote())
        refs = [a.receive_weights_broadcast.remote(metas, version) for a in rollout.actors]
        self._all("broadcast_weights")
        ray.get(refs)
        return sum(math.prod(shape) * to_dtype(dtype).itemsize for _, dtype, shape in metas)

    def weight_digests(self, dtypes: dict[str, str] | None = None) -> dict[str, str]:
        # every rank takes part (ZeRO-3 gathers are collectives); rank 0 answers
        return self._all("weight_digests", dtypes)[0]

    def save_hf(self, out_dir: str) -> str:
        return self._all("save_hf", out_dir)[0]

    def state_dict_cpu(self, rank: int = 0) -> dict:
        # every rank takes part (ZeRO-3 gathers are collectives); one answers
        return self._all("state_dict_cpu")[rank]

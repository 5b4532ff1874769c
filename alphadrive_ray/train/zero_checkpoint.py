"""DeepSpeed ZeRO checkpoints as whole tensors, and re-sharded for another number of learners.

A learner checkpoint (`checkpoints/<name>/learner/state/`, written by `engine.save_checkpoint`)
holds each rank's shard of the fp32 master weights and of Adam's moments:

    ZeRO-1/2  mp_rank_00_model_states.pt              the module (full), param_shapes
              zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                  single_partition_of_fp32_groups[g]  rank r's slice of group g's flat vector
                  base_optimizer_state.state[g]       exp_avg / exp_avg_sq of that slice (padded)
    ZeRO-3    zero_pp_rank_<r>_mp_rank_00_model_states.pt   placeholders, param_shapes
              zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                  fp32_flat_groups[g]                 rank r's chunk of every parameter of group g
                  optimizer_state_dict.state[g]       exp_avg / exp_avg_sq, same layout

ZeRO-1/2 flatten a group's parameters (in `param_shapes` order, each followed by its
alignment padding) into one vector, pad it to a multiple of 2 x world size, and give rank r
the r-th equal slice. ZeRO-3 pads each parameter to a multiple of the world size and gives
rank r the r-th chunk of each, concatenated. These are the rules DeepSpeed's own
`zero_to_fp32.py` reverses; the tests check `full_state` against it.

- `full_state(state_dir, key)`: every parameter whole ("param": fp32 master weights; or an
  Adam moment "exp_avg" / "exp_avg_sq"), from any stage and world size (`alphadrive-ray export`).
- `reshard(old_dir, template_dir, out_dir, rank)`: rank `rank`'s files of a checkpoint laid out
  as `template_dir` (what the new learners' engines save: their world size and stage), with the
  weights, moments, step counts and client state of `old_dir`. DeepSpeed refuses to load a
  ZeRO checkpoint into another data-parallel world size; loading the re-sharded one is its
  ordinary same-size load (`--resume` with another `learner.num_workers`).

Files are read with `torch.load(weights_only=True)`: tensors and three DeepSpeed classes only.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL_STATES_Z12 = "mp_rank_00_model_states.pt"
OPTIM_PATTERN = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointFormatError(ValueError):
    """The folder is not a DeepSpeed checkpoint this module can read."""


def safe_load(path: str | os.PathLike[str], mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True`: tensors, containers and DeepSpeed's three plain classes."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@dataclass
class Shards:
    """The files of one DeepSpeed checkpoint tag folder."""

    folder: Path
    stage: int
    world_size: int
    model_files: list[Path]  # one (ZeRO <= 2) or one per rank (ZeRO-3)
    optim_files: list[Path]  # one per rank, in rank order (empty for stage 0)

    def model_state(self, rank: int = 0) -> dict:
        return safe_load(self.model_files[rank if self.stage == 3 else 0])

    def optim_state(self, rank: int) -> dict:
        return safe_load(self.optim_files[rank], mmap=True)["optimizer_state_dict"]


def find_shards(folder: str | os.PathLike[str]) -> Shards:
    """The shards of a checkpoint: `folder` is a tag folder (holding the .pt files) or a folder
    with one tag folder inside (a learner folder, `learner/state`)."""
    folder = Path(folder)
    if not any(folder.glob("*_model_states.pt")):
        inner = [p for p in folder.iterdir() if p.is_dir() and any(p.glob("*_model_states.pt"))] if folder.is_dir() else []
        if len(inner) != 1:
            raise CheckpointFormatError(f"{folder}: no DeepSpeed checkpoint (*_model_states.pt) here or in one sub-folder")
        folder = inner[0]
    optim = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := OPTIM_PATTERN.match(p.name)))
    if [rank for rank, _ in optim] != list(range(len(optim))):
        raise CheckpointFormatError(f"{folder}: optimizer shards of ranks {[r for r, _ in optim]}; some rank's file is missing")
    if (folder / MODEL_STATES_Z12).is_file():
        model_files = [folder / MODEL_STATES_Z12]
        stage = 0
        if optim:
            stage = int(safe_load(optim[0][1], mmap=True)["optimizer_state_dict"]["zero_stage"])
    else:
        model_files = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=lambda p: int(p.name.split("_")[3]))
        stage = 3
    world_size = len(optim) if optim else int(safe_load(model_files[0]).get("dp_world_size", 1))
    if stage == 3 and len(model_files) != world_size:
        raise CheckpointFormatError(f"{folder}: {len(model_files)} model shards for {world_size} optimizer shards")
    return Shards(folder, stage, world_size, model_files, [p for _, p in optim])


def _param_shapes(model_state: dict) -> list[dict[str, torch.Size]]:
    return [dict(group) for group in model_state["param_shapes"]]


def _flat_groups(shards: Shards, rank: int, key: str) -> list[torch.Tensor | None]:
    """Rank `rank`'s flat vectors, one per group: fp32 weights ("param") or a moment (None for
    a group the optimizer has no state for yet)."""
    osd = shards.optim_state(rank)
    if key == "param":
        return list(osd["single_partition_of_fp32_groups" if shards.stage <= 2 else "fp32_flat_groups"])
    base = osd["base_optimizer_state" if shards.stage <= 2 else "optimizer_state_dict"]
    if not isinstance(base, dict) or "state" not in base:
        raise CheckpointFormatError(f"{shards.folder}: the optimizer state is not a torch state dict (an elastic checkpoint?)")
    state = base["state"]
    groups = len(osd["single_partition_of_fp32_groups" if shards.stage <= 2 else "fp32_flat_groups"])
    return [state[g][key] if g in state else None for g in range(groups)]


def full_state(folder: str | os.PathLike[str], key: str = "param") -> dict[str, torch.Tensor]:
    """Every trained parameter as one fp32 tensor: the weights ("param") or an Adam moment.

    With "param", frozen parameters and buffers saved in the model states are included.
    Raises CheckpointFormatError for a folder that is not a ZeRO checkpoint of stage 0-3, and
    KeyError for a moment the checkpoint does not hold (no optimizer step yet).
    """
    shards = find_shards(folder)
    model_state = shards.model_state(0)
    if shards.stage == 0:
        if key != "param":
            raise CheckpointFormatError(f"{shards.folder}: stage 0 keeps the optimizer whole; its moments are not sharded")
        return {name: t.float() for name, t in model_state["module"].items()}
    shapes = _param_shapes(model_state)
    ranks: list[list[torch.Tensor]] = []
    for r in range(shards.world_size):
        groups = _flat_groups(shards, r, key)
        present = [v for v in groups if v is not None]
        if len(present) != len(groups):
            raise KeyError(f"{shards.folder}: no {key!r} in the optimizer state (was a step taken before the save?)")
        ranks.append(present)
    out: dict[str, torch.Tensor] = {}
    if key == "param":
        out.update({k: v.float() for k, v in model_state["module"].items() if k in set(model_state.get("buffer_names") or [])})
    if shards.stage <= 2:
        paddings = shards.optim_state(0).get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            # a moment keeps each rank's padding; the weights are saved without it
            flat = torch.cat([ranks[r][g] for r in range(shards.world_size)])
            offset = 0
            for j, (name, shape) in enumerate(group.items()):
                numel = math.prod(shape)
                out[name] = flat.narrow(0, offset, numel).view(shape).clone()
                offset += numel + (paddings[g][j] if paddings else 0)
    else:
        merged = {name: shape for group in shapes for name, shape in group.items()}
        flats = [torch.cat(ranks[r]) for r in range(shards.world_size)]
        offset = 0
        for name, shape in merged.items():
            numel = math.prod(shape)
            chunk = math.ceil(numel / shards.world_size)
            whole = torch.cat([flat.narrow(0, offset, chunk) for flat in flats])
            out[name] = whole[:numel].view(shape).clone()
            offset += chunk
    if key == "param":
        out.update({k: v.float() for k, v in (model_state.get("frozen_param_fragments") or {}).items() if shards.stage <= 2})
        for alias, source in (model_state.get("shared_params") or {}).items():
            if source in out:
                out[alias] = out[source]
    return out


def optimizer_steps(folder: str | os.PathLike[str]) -> float:
    """Adam's step count in the checkpoint (the same on every rank and group)."""
    shards = find_shards(folder)
    osd = shards.optim_state(0)
    base = osd["base_optimizer_state" if shards.stage <= 2 else "optimizer_state_dict"]
    steps = [float(s["step"]) for s in base["state"].values()]
    return steps[0] if steps else 0.0


def checkpoint_layout(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """(ZeRO stage, data-parallel world size) of a checkpoint."""
    shards = find_shards(folder)
    return shards.stage, shards.world_size


def reshard(old_dir: str | os.PathLike[str], template_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], rank: int) -> None:
    """Write rank `rank`'s files of `old_dir`'s state in `template_dir`'s layout into `out_dir`.

    `template_dir` is a checkpoint the new learners just saved (same model, any stage 1-3 and
    world size): its sizes, paddings and parameter order are kept, its values replaced by
    `old_dir`'s weights, Adam moments and step counts; the client state (stage, step, RNG)
    is `old_dir`'s. Every new rank calls it for itself (ZeRO <= 2: rank 0 also writes the
    module file).
    """
    old, new = find_shards(old_dir), find_shards(template_dir)
    if old.stage == 0 or new.stage == 0:
        raise CheckpointFormatError("stage 0 checkpoints hold whole tensors: they load into any world size as they are")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = {key: full_state(old.folder, key) for key in ("param", *MOMENTS)}
    step = optimizer_steps(old.folder)
    old_model = old.model_state(0)
    template_model = new.model_state(rank)
    shapes = _param_shapes(template_model)
    names = [name for group in shapes for name in group]
    missing = [name for name in names if name not in values["param"]]
    if missing:
        raise CheckpointFormatError(f"{old.folder}: parameters of the new model not in the checkpoint: {missing[:5]}")

    osd = safe_load(new.optim_files[rank])
    inner = osd["optimizer_state_dict"]
    template_flats = inner["single_partition_of_fp32_groups" if new.stage <= 2 else "fp32_flat_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    if new.stage <= 2:
        paddings = inner.get("param_alignment_paddings")
        group_paddings = inner["group_paddings"]
        weights = []
        for g, group in enumerate(shapes):
            size = template_flats[g].numel() + group_paddings[g]  # the padded slice of every rank
            parts = {
                key: _z12_slice(values[key], group, paddings[g] if paddings else None, size, rank, new.world_size) for key in ("param", *MOMENTS)
            }
            weights.append(parts["param"][: template_flats[g].numel()].clone())
            state[g] = {"step": torch.tensor(step), **{key: parts[key] for key in MOMENTS}}
        inner["single_partition_of_fp32_groups"] = weights
        inner["base_optimizer_state"] = {"state": state, "param_groups": _param_groups(inner["base_optimizer_state"], len(shapes))}
    else:
        merged = [name for group in shapes for name in group]
        sizes = [flat.numel() for flat in template_flats]
        parts = {key: _z3_chunks(values[key], merged, new.world_size, rank) for key in ("param", *MOMENTS)}
        if parts["param"].numel() != sum(sizes):
            raise CheckpointFormatError(f"{template_dir}: rank {rank} holds {sum(sizes)} elements, the layout gives {parts['param'].numel()}")
        inner["fp32_flat_groups"] = list(parts["param"].split(sizes))
        for g, chunk in enumerate(zip(*(parts[key].split(sizes) for key in MOMENTS))):
            state[g] = {"step": torch.tensor(step), **dict(zip(MOMENTS, (c.clone() for c in chunk)))}
        inner["optimizer_state_dict"] = {"state": state, "param_groups": _param_groups(inner["optimizer_state_dict"], len(sizes))}
    torch.save(osd, out / new.optim_files[rank].name)

    model = dict(template_model)
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in old_model:
            model[key] = old_model[key]
    # the client state (what `save_checkpoint(client_state=...)` added) travels as it was
    known = set(template_model) | {"module", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params", "frozen_param_fragments"}
    model.update({k: v for k, v in old_model.items() if k not in known})
    if new.stage <= 2 and rank == 0:
        dtypes = {name: t.dtype for name, t in template_model["module"].items()}
        model["module"] = {
            name: values["param"][name].to(dtypes[name]) if name in values["param"] else t for name, t in template_model["module"].items()
        }
    if new.stage <= 2 and rank != 0:
        return
    torch.save(model, out / new.model_files[rank if new.stage == 3 else 0].name)


def _param_groups(template: dict, n: int) -> list[dict]:
    groups = [dict(g) for g in template.get("param_groups", [])]
    for g, group in enumerate(groups):
        group["params"] = [g]
    if len(groups) != n:
        raise CheckpointFormatError(f"the template has {len(groups)} optimizer groups for {n} flat groups")
    return groups


def _z12_slice(
    values: dict[str, torch.Tensor], group: dict[str, torch.Size], paddings: list[int] | None, size: int, rank: int, world: int
) -> torch.Tensor:
    """Rank `rank`'s padded slice of a ZeRO-1/2 group's flat vector."""
    pieces = []
    for j, name in enumerate(group):
        pieces.append(values[name].float().flatten())
        if paddings and paddings[j]:
            pieces.append(torch.zeros(paddings[j]))
    flat = torch.cat(pieces)
    if flat.numel() > size * world:
        raise CheckpointFormatError(f"a group of {flat.numel()} elements does not fit {world} slices of {size}")
    flat = torch.cat([flat, torch.zeros(size * world - flat.numel())])
    return flat.narrow(0, rank * size, size).clone()


def _z3_chunks(values: dict[str, torch.Tensor], names: list[str], world: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s ZeRO-3 chunks of every parameter (padded to a multiple of the world size), concatenated."""
    pieces = []
    for name in names:
        flat = values[name].float().flatten()
        chunk = math.ceil(flat.numel() / world)
        flat = torch.cat([flat, torch.zeros(chunk * world - flat.numel())])
        pieces.append(flat.narrow(0, rank * chunk, chunk))
    return torch.cat(pieces).clone()

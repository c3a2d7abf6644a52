"""Data-parallel: each rank (or each CFG-parallel group) generates a contiguous share of the prompts.

Shares are balanced contiguous blocks (sizes differ by at most one), so concatenating them in rank order gives back
the original order: no prompt is generated twice or dropped, whatever the count.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from ._collectives import group_ranks, require_process_group
from .cfg_parallel import cfg_parallel_group


def block(count: int, parts: int, index: int) -> range:
    """Indices of share `index` when `count` items are cut into `parts` contiguous, balanced shares."""
    return range(count * index // parts, count * (index + 1) // parts)


def shard(items: Sequence, *, group=None) -> list:
    """This rank's contiguous share of `items`; :func:`gather` puts the shares back together in order.

    Example::

        mine = shard(prompts)
        images = gather([pipe(p).images[0] for p in mine])   # every rank: all images, in prompt order
    """
    require_process_group()
    return [items[i] for i in block(len(items), dist.get_world_size(group), dist.get_rank(group))]


def gather(local: Sequence, *, group=None) -> list:
    """Concatenate every rank's `local` list in rank order; every rank gets the whole list.

    Items travel pickled (``all_gather_object``): tensors are best moved to the CPU first. With nccl, call
    ``torch.cuda.set_device(local_rank)`` beforehand, as torch.distributed requires for object collectives.
    """
    require_process_group()
    shares: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, list(local), group=group)
    return [item for share in shares for item in share]


def generate_data_parallel(
    pipe,
    inputs: Sequence[str] | torch.Tensor | Mapping[str, Sequence | torch.Tensor],
    *,
    batch_size: int = 1,
    seed: int | None = None,
    group=None,
    **call_kwargs,
) -> list:
    """Generate one result per input, spread over the ranks of `group`, and return all of them on every rank.

    `inputs` is a list of prompts, a tensor of prompt embeddings (first dimension: one per prompt), or a dict of
    per-prompt pipeline arguments of equal length, such as ``{"prompt_embeds": e, "negative_prompt_embeds": n}``.
    `call_kwargs` go unchanged to every pipeline call. With `seed`, the i-th image of the result is drawn from its own
    ``torch.Generator().manual_seed(seed + i)``, so the images do not depend on the number of ranks or on
    `batch_size`. If CFG-parallel is enabled on `pipe`, each CFG group acts as one replica and its ranks share work.

    Returns the pipeline's first output (``images``) flattened per image, in input order (``num_images_per_prompt``
    images per input, input-major); tensors come back on the CPU.

    Example (``torchrun --nproc-per-node 2 generate.py``)::

        images = generate_data_parallel(pipe, prompts, seed=0, num_inference_steps=30)
        if torch.distributed.get_rank() == 0:
            for i, image in enumerate(images):
                image.save(f"{i}.png")
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if seed is not None and "generator" in call_kwargs:
        raise ValueError("pass either seed (one generator per image, independent of the world size) or generator")
    per_input = _per_input_arguments(inputs)
    count = len(next(iter(per_input.values())))
    images_per_input = call_kwargs.get("num_images_per_prompt") or 1
    require_process_group()
    _check_current_device(pipe, group)

    replica, replicas, leader = _replica_layout(pipe, group, agreed=(count, batch_size, seed, images_per_input))
    mine = block(count, replicas, replica)
    results = []
    for begin in range(mine.start, mine.stop, batch_size):
        indices = range(begin, min(begin + batch_size, mine.stop))
        kwargs = {name: values[indices.start : indices.stop] for name, values in per_input.items()}
        if seed is not None:
            kwargs["generator"] = [
                torch.Generator().manual_seed(seed + i * images_per_input + j)
                for i in indices
                for j in range(images_per_input)
            ]
        images = _per_image(pipe(**kwargs, **call_kwargs))
        if len(images) != len(indices) * images_per_input:
            raise RuntimeError(f"the pipeline returned {len(images)} images for {len(indices)} inputs")
        results.extend(images)

    shares: list = [None] * dist.get_world_size(group)
    # Only one rank per replica sends; the others of a CFG group computed the same images.
    dist.all_gather_object(shares, (replica, results if leader else None), group=group)
    by_replica = dict(share for share in shares if share[1] is not None)
    return [image for r in range(replicas) for image in by_replica[r]]


def _check_current_device(pipe, group) -> None:
    # nccl's object collectives run on the current CUDA device; if that is another rank's GPU they hang or fail.
    device = getattr(pipe, "device", None)
    if "nccl" not in str(dist.get_backend(group)) or not isinstance(device, torch.device) or device.type != "cuda":
        return
    if device.index is not None and device.index != torch.cuda.current_device():
        raise RuntimeError(
            f"the pipeline is on {device} but the current CUDA device is cuda:{torch.cuda.current_device()}: "
            f"call torch.cuda.set_device({device.index}) (the local rank) before init_process_group"
        )


def _per_input_arguments(inputs) -> dict[str, Sequence | torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        inputs = {"prompt_embeds": inputs}
    elif isinstance(inputs, str):
        raise TypeError("inputs must be a list of prompts, not one string")
    elif not isinstance(inputs, Mapping):
        inputs = {"prompt": list(inputs)}
    if not inputs:
        raise ValueError("inputs must not be empty; pass a list with no prompts for no images")
    lengths = {name: len(values) for name, values in inputs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"every per-input argument needs the same length, got {lengths}")
    return dict(inputs)


def _per_image(output) -> list:
    images = output[0]  # `images` of a pipeline output, or the first item of `return_dict=False`'s tuple
    return [image.cpu() if isinstance(image, torch.Tensor) else image for image in images]


def _replica_layout(pipe, group, agreed: tuple) -> tuple[int, int, bool]:
    """(this rank's replica index, number of replicas, whether this rank reports its replica's images).

    A replica is one CFG-parallel group if the pipeline has one, else one rank. One object all-gather finds the
    replicas and, on the way, checks that every rank was asked for the same work.
    """
    cfg_group = cfg_parallel_group(pipe)
    me = tuple(group_ranks(cfg_group)) if cfg_group is not None else (dist.get_rank(),)
    views: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(views, (me, agreed), group=group)
    if len({view[1] for view in views}) > 1:
        detail = ", ".join(f"rank {rank}: {view[1]}" for rank, view in zip(group_ranks(group), views))
        raise ValueError(f"ranks disagree on (inputs, batch_size, seed, images per input): {detail}")
    replicas = sorted({view[0] for view in views})
    members = [rank for replica in replicas for rank in replica]
    if len(members) != len(set(members)) or set(members) != set(group_ranks(group)):
        raise ValueError(f"CFG-parallel groups {replicas} must partition the data-parallel ranks {group_ranks(group)}")
    return replicas.index(me), len(replicas), dist.get_rank() == min(me)

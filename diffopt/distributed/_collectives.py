"""The few collectives the parallel modes share.

Everything here is called by every rank of a group at the same point of the program; a rank that skips a call
leaves the others waiting, so callers decide *whether* to call from values that are equal on all ranks.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
import torch.distributed as dist

# How many values of how many tensors the input check compares: enough to tell two seeds or two prompts apart,
# small enough to cost nothing, and fixed, so that ranks that disagree about shapes still exchange equal sizes.
SAMPLED_TENSORS = 32
SAMPLES_PER_TENSOR = 256
# Ranks compute prompt embeddings (or VAE-encoded images) on their own GPU: allow for kernels that round
# differently (cudnn.benchmark picks per GPU); another seed or prompt differs by order 1.
INPUT_RTOL = 1e-2


def require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "diffopt.distributed needs an initialized process group: launch with `torchrun` or `accelerate launch` "
            "and call torch.distributed.init_process_group() (accelerate's Accelerator() does) before using it"
        )


def group_ranks(group) -> list[int]:
    """Global ranks of `group`, in group order."""
    return dist.get_process_group_ranks(group or dist.group.WORLD)


def comm_device(group, device: torch.device) -> torch.device:
    # gloo only moves CPU tensors; nccl and the accelerator backends take tensors where they live.
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def _all_gather_single(output: torch.Tensor, local: torch.Tensor, group):
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single and deprecated the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, local, group=group, async_op=True)


def all_gather_batch(local: Sequence[torch.Tensor], group) -> list[torch.Tensor]:
    """Concatenate every rank's `local[i]` along dim 0, in group-rank order, for each i.

    All gathers are in flight together; a channels_last tensor is sent as its NHWC view so that it needs no copy and
    comes back channels_last (what the UNet, after optimize(memory_format="channels_last"), expects).
    """
    size = dist.get_world_size(group)
    pending = []
    for tensor in local:
        channels_last = (
            tensor.dim() == 4
            and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last)
        )
        send = tensor.permute(0, 2, 3, 1) if channels_last else tensor.contiguous()
        send = send.to(comm_device(group, tensor.device))
        received = send.new_empty((size * send.shape[0], *send.shape[1:]))
        pending.append((_all_gather_single(received, send, group), received, channels_last, tensor.device))
    gathered = []
    for work, received, channels_last, device in pending:
        work.wait()
        gathered.append((received.permute(0, 3, 1, 2) if channels_last else received).to(device))
    return gathered


def _moments(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Three float64 sums over all of `tensors`: equal for bitwise-equal inputs, different for anything else."""
    moments = torch.zeros(3, dtype=torch.float64)
    for position, tensor in enumerate(tensors, start=1):
        values = tensor.detach().to(torch.float64)
        stats = torch.stack([position * values.sum(), values.abs().sum(), values.square().sum()])
        # Accumulate where the tensors live: one host transfer at the end, not one sync per tensor.
        moments = stats if position == 1 else moments + stats.to(moments.device)
    return moments.cpu()


def _samples(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[SAMPLED_TENSORS, SAMPLES_PER_TENSOR] float64: values at evenly spread positions of each tensor, 0-padded."""
    rows = []
    for tensor in tensors[:SAMPLED_TENSORS]:
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            rows.append(torch.zeros(SAMPLES_PER_TENSOR, dtype=torch.float64))
            continue
        positions = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR, device=flat.device).long()
        rows.append(flat[positions].to(torch.float64).nan_to_num(nan=0.0, posinf=1e30, neginf=-1e30))
    rows = [row.cpu() for row in rows]  # small; once per pipeline call
    table = torch.zeros(SAMPLED_TENSORS, SAMPLES_PER_TENSOR, dtype=torch.float64)
    if rows:
        table[: len(rows)] = torch.stack(rows)
    return table


def _first_difference(signatures: Sequence[str]) -> list[str]:
    # Signatures are one item per line: show each rank's first item that is not the same everywhere, not all.
    lines = [text.splitlines() for text in signatures]
    for i in range(max(map(len, lines))):
        items = [rank_lines[i] if i < len(rank_lines) else "(nothing)" for rank_lines in lines]
        if len(set(items)) > 1:
            return items
    return list(signatures)


def check_ranks_agree(
    what: str,
    signature: str,
    tensors: Sequence[torch.Tensor],
    group,
    device: torch.device,
    *,
    names: Sequence[str] | None = None,
    exact: bool = False,
) -> None:
    """Raise the same RuntimeError on every rank of `group` unless all ranks passed equal `signature` and `tensors`.

    `signature` describes shapes, dtypes and options as text, one item per line, and must match exactly.
    `tensors` are compared by checksums of all their values if `exact` (weights, loaded bit for bit), else by
    sampled values up to a relative difference of INPUT_RTOL (inputs, which each rank may compute itself).
    """
    values = _moments(tensors) if exact else _samples(tensors).reshape(-1)
    mine = torch.cat([torch.tensor([float(zlib.crc32(signature.encode()))], dtype=torch.float64), values])
    mine = mine.to(comm_device(group, device))
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    rows = torch.stack(everyone).cpu()
    ranks = group_ranks(group)

    if (rows[:, 0] != rows[0, 0]).any():
        # Every rank saw the same rows, so every rank is here: one more collective to show each rank's view.
        signatures: list = [None] * len(rows)
        dist.all_gather_object(signatures, signature, group=group)
        detail = "\n".join(f"  rank {rank}: {item}" for rank, item in zip(ranks, _first_difference(signatures)))
        raise RuntimeError(f"{what}: ranks were given different shapes, dtypes or options:\n{detail}")

    if exact:
        same = torch.isclose(rows[:, 1:], rows[0, 1:], rtol=0, atol=0, equal_nan=True).all(dim=1)
        if not same.all():
            detail = "\n".join(f"  rank {rank}: checksums {row[1:].tolist()}" for rank, row in zip(ranks, rows))
            raise RuntimeError(
                f"{what}: ranks hold different values (different checkpoints, a LoRA loaded on some ranks only, "
                f"or random weights without a common seed):\n{detail}"
            )
        return

    samples = rows[:, 1:].reshape(len(rows), SAMPLED_TENSORS, SAMPLES_PER_TENSOR)
    difference = (samples - samples[0]).norm(dim=2) / samples[0].norm(dim=1).clamp_min(1e-12)
    if (difference <= INPUT_RTOL).all():
        return
    rank_index, tensor_index = [int(i) for i in (difference > INPUT_RTOL).nonzero()[0]]
    name = names[tensor_index] if names and tensor_index < len(names) else f"tensor {tensor_index}"
    raise RuntimeError(
        f"{what}: ranks were given equal shapes but different values (different seeds, latents or prompts): "
        f"{name} of rank {ranks[rank_index]} differs from rank {ranks[0]}'s by "
        f"{float(difference[rank_index, tensor_index]):.3g} (relative); give every rank the same inputs and "
        "the same generator seed"
    )

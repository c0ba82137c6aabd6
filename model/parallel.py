"""One forward pass across a group of devices: guidance-parallel over the batch, sequence-parallel over tokens.

A group of ``guidance x sequence`` ranks runs every pass together (``worker/group.py`` keeps the ranks in
step). :meth:`UniViGUTransformer.run_blocks` hands its input to :meth:`ParallelPlan.split` and the
blocks' output to :meth:`ParallelPlan.join`; everything before (embeddings) and after (heads, step cache,
samplers) runs on every rank on whole tensors, exactly as on one device.

* Guidance-parallel: a guided pass is a batch of two rows (conditional, unconditional). When the batch
  divides by the guidance degree, each guidance group takes its share of the rows; otherwise (a caption,
  a guidance scale of 1) every guidance group computes the same rows.
* Sequence-parallel: each rank of a guidance group keeps ``1/N`` of the video tokens and ``1/N`` of the
  text tokens (``tensor_split``: the lengths need not divide ``N``), with the matching rows of each
  rotary table. Everything in a block but the joint self-attention works per token and runs on those
  tokens (the prompt, the cross-attention's keys, is on every rank). The self-attention is diffusers'
  Ulysses attention (``ContextParallelConfig(ulysses_anything=True)``), reached through the same
  ``dispatch_attention_fn`` call as on one device: an all-to-all trades tokens for heads, each rank
  attends over every token with ``H/N`` heads, and a second all-to-all trades them back.

What diffusers does not express, and so this module does: diffusers' plan language (``_cp_plan``, applied
by hooks) splits and gathers named inputs and outputs of modules, one tensor along one dimension. Our
sequence is two streams joined inside ``embed``, and each must be split on its own so that every rank
keeps both modalities (the blocks route modulation and feed-forward by modality); the flattened video
tokens are no module's output (the patch embedding returns a 5-D grid); the key padding mask is an
argument of ``embed``, not of a module; and the step cache compares whole hidden states between steps.
So the hidden state, the two rotary tables and the mask are split here and the output gathered here
(one all-gather). The key mask is handed to the attention in the order the keys have after the
all-to-all (rank by rank, each rank's video then text), which every rank can build on its own; diffusers'
own gather of a per-rank mask pads short ranks in the middle of the sequence when ranks hold different
token counts, so it is not used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model.errors import InvalidParameterError

if TYPE_CHECKING:
    from model.network import PassState

MESH_DIMS = ("guidance", "ring", "ulysses")
"""The group's mesh: guidance groups, then diffusers' two context-parallel dimensions (ring kept at 1)."""
GUIDANCE_DEGREES = (1, 2)


def check_degrees(guidance: int, sequence: int, heads: int) -> None:
    """Guidance degree 1 or 2; a sequence degree that divides the number of attention heads."""
    if guidance not in GUIDANCE_DEGREES:
        raise InvalidParameterError(
            f"guidance_parallel must be 1 or 2 (the two passes of guidance), got {guidance}",
            param="guidance_parallel",
        )
    if sequence < 1 or heads % sequence:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise InvalidParameterError(
            f"sequence_parallel must divide the model's {heads} attention heads (Ulysses gives each rank "
            f"heads / sequence_parallel of them); choose one of {divisors}, got {sequence}",
            param="sequence_parallel",
        )


def split_sizes(length: int, parts: int) -> list[int]:
    """The lengths ``torch.tensor_split`` gives ``parts`` pieces of ``length`` items: the first ones longer."""
    return [length // parts + (1 if index < length % parts else 0) for index in range(parts)]


@dataclass(frozen=True)
class LocalPass:
    """This rank's share of one pass and what :meth:`ParallelPlan.join` needs to rebuild the whole."""

    hidden: torch.Tensor  # (B_local, Nv_r + L_r, D)
    state: PassState  # with this rank's rows, token counts, rotary rows and the all-to-all key order
    batch: int  # B of the whole pass
    num_video: int  # Nv of the whole pass
    num_text: int  # L of the whole pass


class ParallelPlan:
    """Where one pass's rows and tokens go on a ``guidance x sequence`` group, and how they come back.

    Build it on every rank of an initialised process group with :meth:`build`, then give it to
    :meth:`UniViGUTransformer.enable_parallelism`. ``attention`` is diffusers' ``ParallelConfig`` for the
    Ulysses attention (None when the sequence degree is 1).
    """

    def __init__(self, mesh: DeviceMesh, device: torch.device) -> None:
        self.mesh = mesh
        self.guidance = mesh["guidance"].size()
        self.sequence = mesh["ulysses"].size()
        self.guidance_rank = mesh["guidance"].get_local_rank()
        self.sequence_rank = mesh["ulysses"].get_local_rank()
        self.attention: ParallelConfig | None = None
        if self.sequence > 1:
            self.attention = ParallelConfig(
                context_parallel_config=ContextParallelConfig(
                    ulysses_degree=self.sequence, ulysses_anything=True
                )
            )
            self.attention.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)

    @classmethod
    def build(cls, guidance: int, sequence: int, device: torch.device) -> ParallelPlan:
        """The plan of this process group (``guidance * sequence`` ranks, in that order) on ``device``."""
        mesh = init_device_mesh(device.type, (guidance, 1, sequence), mesh_dim_names=MESH_DIMS)
        return cls(mesh, device)

    def _rows(self, batch: int) -> slice:
        """The batch rows this rank's guidance group computes: its share, or all when they do not divide."""
        if self.guidance == 1 or batch % self.guidance:
            return slice(None)
        share = batch // self.guidance
        return slice(self.guidance_rank * share, (self.guidance_rank + 1) * share)

    def _mine(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor.tensor_split(self.sequence, dim)[self.sequence_rank]

    def _key_order(self, mask: torch.Tensor, num_video: int) -> torch.Tensor:
        """``mask (B, 1, 1, Nv + L)`` in the order of the keys after the all-to-all: rank by rank, each
        rank's video keys then its text keys."""
        video = mask[..., :num_video].tensor_split(self.sequence, -1)
        text = mask[..., num_video:].tensor_split(self.sequence, -1)
        return torch.cat([part for pair in zip(video, text, strict=True) for part in pair], dim=-1)

    def split(self, hidden: torch.Tensor, state: PassState) -> LocalPass:
        """``hidden (B, Nv + L, D)`` and its pass state -> this rank's rows and tokens.

        Raises :class:`InvalidParameterError` when the video has fewer tokens than the sequence degree.
        """
        batch, length, _ = hidden.shape
        num_video = state.num_video
        if num_video < self.sequence:
            raise InvalidParameterError(
                f"this video has {num_video} tokens, fewer than the {self.sequence} devices it would be "
                "split across (sequence_parallel); ask for more frames or a larger size"
            )
        rows = self._rows(batch)
        video = self._mine(hidden[rows, :num_video], 1)
        text = self._mine(hidden[rows, num_video:], 1)
        mask = state.key_mask
        local_state = dataclasses.replace(
            state,
            context=state.context[rows],
            modulation_v=state.modulation_v[rows],
            modulation_t=state.modulation_t[rows],
            num_video=video.shape[1],
            video_rope=(self._mine(state.video_rope[0], 0), self._mine(state.video_rope[1], 0)),
            text_rope=(self._mine(state.text_rope[0], 0), self._mine(state.text_rope[1], 0)),
            key_mask=None if mask is None else self._key_order(mask[rows], num_video),
        )
        return LocalPass(torch.cat([video, text], dim=1), local_state, batch, num_video, length - num_video)

    def join(self, local: torch.Tensor, split: LocalPass) -> torch.Tensor:
        """This rank's output ``(B_local, Nv_r + L_r, D)`` -> the whole ``(B, Nv + L, D)``, on every rank."""
        hidden = self._gather_tokens(local, split.num_video, split.num_text)
        if hidden.shape[0] == split.batch:
            return hidden
        whole = hidden.new_empty(split.batch, *hidden.shape[1:])  # each group's rows, in order
        dist.all_gather_single(whole, hidden.contiguous(), group=self.mesh["guidance"].get_group())
        return whole

    def _gather_tokens(self, local: torch.Tensor, num_video: int, num_text: int) -> torch.Tensor:
        """Every rank's tokens of its guidance group, in the original order ``[video | text]``."""
        if self.sequence == 1:
            return local
        video_sizes = split_sizes(num_video, self.sequence)
        text_sizes = split_sizes(num_text, self.sequence)
        longest = video_sizes[0] + text_sizes[0]  # ranks hold different counts: pad to the longest
        padded = F.pad(local, (0, 0, 0, longest - local.shape[1])).contiguous()
        stacked = padded.new_empty(self.sequence * padded.shape[0], *padded.shape[1:])  # (N * B, longest, D)
        dist.all_gather_single(stacked, padded, group=self.mesh["ulysses"].get_group())
        stacked = stacked.unflatten(0, (self.sequence, -1))  # (N, B, longest, D)
        video = [part[:, :size] for part, size in zip(stacked, video_sizes, strict=True)]
        text = [
            part[:, start : start + size]
            for part, start, size in zip(stacked, video_sizes, text_sizes, strict=True)
        ]
        return torch.cat(video + text, dim=1)

"""Speed options for a U-Net: channels_last memory format and torch.compile with h-space hooks intact.

``torch.compile`` is applied to the ``forward`` of each down block, the mid block and each up
block, not to the whole U-Net: forward hooks (h capture, edits, h-swap; see
:class:`hspace.model.MidBlockHook`) run in ``nn.Module.__call__`` around the compiled
``mid_block.forward``, so setting or clearing an edit between steps never invalidates a graph,
and the timestep reaches the blocks only as the embedding tensor, so the 50 steps of a sampling
run reuse one graph per block. The first call compiles (seconds to minutes); a new batch size
compiles once more with dynamic shapes. Every option works on the CPU (inductor generates C++
there); a GPU only changes the speed.

The eager ``forward`` of each compiled block is kept: :func:`eager` restores it temporarily for
code that transforms the U-Net with ``torch.func`` (the Jacobian's JVPs), which compiled graphs
do not support.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["accelerate", "compiled_blocks", "eager"]

_EAGER = "_hspace_eager_forward"


def compiled_blocks(unet: nn.Module) -> list[nn.Module]:
    """The blocks whose ``forward`` :func:`accelerate` compiles: down blocks, mid block, up blocks."""
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def accelerate(
    unet: nn.Module,
    *,
    channels_last: bool = False,
    compile: bool | str = False,
    backend: str = "inductor",
    dynamic: bool | None = None,
) -> nn.Module:
    """Apply the speed options to ``unet`` in place and return it.

    Args:
        channels_last: store conv weights as NHWC (``torch.channels_last``); inputs follow.
        compile: ``True`` or a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``) compiles each block's forward; ``False`` leaves it eager.
        backend: the ``torch.compile`` backend (``"inductor"``; ``"eager"``/``"aot_eager"`` for checks).
        dynamic: passed to ``torch.compile`` (None: dynamic after the first shape change).
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        mode = None if compile is True else str(compile)
        for block in compiled_blocks(unet):
            if hasattr(block, _EAGER):
                continue  # already compiled
            setattr(block, _EAGER, block.forward)
            block.forward = torch.compile(block.forward, mode=mode, backend=backend, dynamic=dynamic)
    return unet


def is_compiled(unet: nn.Module) -> bool:
    return any(hasattr(b, _EAGER) for b in compiled_blocks(unet))


@contextlib.contextmanager
def eager(unet: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every compiled block of ``unet`` runs its eager forward."""
    saved: list[tuple[nn.Module, Any]] = []
    for block in compiled_blocks(unet) if hasattr(unet, "mid_block") else []:
        if hasattr(block, _EAGER):
            saved.append((block, block.forward))
            block.forward = getattr(block, _EAGER)
    try:
        yield unet
    finally:
        for block, fwd in saved:
            block.forward = fwd

"""ST-Adapter: spatio-temporal adapters that turn an image transformer into a video model.

Pan, Lin, Zhu, Shao and Li, "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning",
NeurIPS 2022. A frozen image ViT (CLIP's vision tower) reads a clip of T frames folded into the
batch, (B*T, 1 + H*W, C). Before a block, each patch token goes through a down-projection, a
depth-wise 3D convolution over (time, height, width) of the patch grid, and an up-projection, added
back to the residual stream: x + up(dwconv3d(down(x))). The class token is left as it is (the
official code adapts the patch tokens only). Following the official code the convolution starts at
zero, so a fresh adapter is the identity, and the kernel is (kernel_t, 1, 1): time only.

Site kind "sequential" on the block input: a forward pre-hook on each vision block (the paper's
adapter before the attention). The number of frames T comes from the constructor or, per batch, from
`petlsearch.plugins.context.use(frames=T)`; without either every image is a clip of one frame.
`clips_from_images` builds short moving clips from still images for tests and small video tasks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins.base import Plugin
from petlsearch.plugins.context import extras
from petlsearch.plugins.mechanisms.hooks import PETLModule
from petlsearch.searchspace.dims import ChoiceDim, Dim, IntDim
from petlsearch.searchspace.memory import BatchShape
from petlsearch.searchspace.recipe import Recipe
from petlsearch.searchspace.sites import Site, block_sites


class STAdapterModule(PETLModule):
    """x -> x + gate * [0 for the class tokens; up(dwconv3d(down(patches)))] at a block's input."""

    def __init__(self, site: Site, cfg: dict[str, Any], frames: int | None, prefix_tokens: int) -> None:
        super().__init__(site)
        width, kt = cfg["bottleneck"], cfg["kernel_t"]
        self.frames = frames
        self.prefix_tokens = prefix_tokens
        self.down = nn.Linear(site.in_features, width)
        self.conv = nn.Conv3d(width, width, kernel_size=(kt, 1, 1), padding=(kt // 2, 0, 0), groups=width)
        self.up = nn.Linear(width, site.out_features)
        for p in (self.conv.weight, self.conv.bias, self.down.bias, self.up.bias):
            nn.init.zeros_(p)  # zero convolution: the identity at init, as in the official code

    def hook(self, model: nn.Module, target: nn.Module) -> None:
        self._handles.append(target.register_forward_pre_hook(self._on_input, with_kwargs=True))

    def _on_input(self, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self.gate_off:
            return None
        if args:
            x = args[0]
            return (x + self.gated(self.delta(x)), *args[1:]), kwargs
        x = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": x + self.gated(self.delta(x))}

    def num_frames(self, batch: int) -> int:
        frames = self.frames or extras().get("frames") or 1
        if batch % frames:
            raise PluginError(f"st_adapter at {self.site.key}: batch of {batch} frames is not a whole "
                              f"number of clips of {frames} frames")
        return int(frames)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        bt, length, _ = x.shape  # (B*T, prefix + H*W, C)
        frames = self.num_frames(bt)
        patches = length - self.prefix_tokens
        side = math.isqrt(patches)
        if side * side != patches:
            raise PluginError(f"st_adapter at {self.site.key}: {patches} patch tokens do not form a square "
                              f"grid (sequence {length}, {self.prefix_tokens} class token(s))")
        z = self.down(x[:, self.prefix_tokens:])  # (B*T, H*W, w)
        width = z.shape[-1]
        z = z.reshape(bt // frames, frames, side, side, width).permute(0, 4, 1, 2, 3)  # (B, w, T, H, W)
        z = self.conv(z).permute(0, 2, 3, 4, 1).reshape(bt, patches, width)  # (B*T, H*W, w)
        z = self.up(z)  # (B*T, H*W, C)
        return F.pad(z, (0, 0, self.prefix_tokens, 0))  # class tokens unchanged


class STAdapter(Plugin):
    name = "st_adapter"
    description = "Spatio-temporal adapter (depth-wise 3D conv in a bottleneck) for video on image ViTs"
    paper = "Pan et al., ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning, NeurIPS 2022"
    kinds = ("sequential",)
    recipe = Recipe(lr=1e-3, source=(
        "Pan et al. train ST-Adapters at 1e-3 (video, not measured here: no video backbone installs offline)"))

    def __init__(self, frames: int | None = None, prefix_tokens: int = 1, max_bottleneck: int = 384,
                 stacks: tuple[str, ...] = ("vision",)) -> None:
        self.frames = frames
        self.prefix_tokens = prefix_tokens
        self.max_bottleneck = max_bottleneck
        self.stacks = stacks

    def sites(self, graph: Any) -> list[Site]:
        return [s for s in block_sites(graph, "sequential") if s.stack in self.stacks and s.in_features]

    def dims(self, site: Site) -> dict[str, Dim]:
        high = max(1, min(self.max_bottleneck, site.in_features))
        return {
            "bottleneck": IntDim("bottleneck", default=max(1, min(high, site.in_features // 2)), low=1,
                                 high=high, log=True, help="adapter width (384 for ViT-B/16 in the paper)"),
            "kernel_t": ChoiceDim("kernel_t", default=3, choices=(1, 3, 5),
                                  help="temporal size of the depth-wise kernel (kernel_t x 1 x 1)"),
        }

    def count(self, site: Site, cfg: dict[str, Any]) -> int:
        c, w = site.in_features, cfg["bottleneck"]
        return (c * w + w) + (w * cfg["kernel_t"] + w) + (w * c + c)  # down, depth-wise conv, up

    def build(self, site: Site, cfg: dict[str, Any]) -> STAdapterModule:
        return STAdapterModule(site, cfg, self.frames, self.prefix_tokens)

    def activation_elements(self, site: Site, cfg: dict[str, Any], shape: BatchShape) -> int:
        # the down-projection's input, the convolution's input and the up-projection's input
        return shape.tokens * (site.in_features + 2 * cfg["bottleneck"])


def _translate(images: torch.Tensor, dx: int) -> torch.Tensor:
    """Shift (..., H, W) images by dx pixels along W (right if dx > 0), filling with zeros."""
    if dx == 0:
        return images.clone()
    out = torch.zeros_like(images)
    if dx > 0:
        out[..., dx:] = images[..., :-dx]
    else:
        out[..., :dx] = images[..., -dx:]
    return out


def clips_from_images(images: torch.Tensor, labels: torch.Tensor, frames: int,
                      shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips of `frames` frames in which each image moves `shift` pixels per frame along the width,
    centred on its original position: (N, C, H, W) -> (N, T, C, H, W); labels are the images'.

    A negative `shift` moves left; `clips.flip(1)` plays a clip backwards (same frames, reversed
    order), which only a model with temporal modelling can tell apart.
    """
    if images.dim() != 4:
        raise ValueError(f"clips_from_images expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    centre = (frames - 1) / 2
    offsets = [round((t - centre) * shift) for t in range(frames)]
    clips = torch.stack([_translate(images, dx) for dx in offsets], dim=1)
    return clips, labels

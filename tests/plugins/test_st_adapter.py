"""ST-Adapter: exact counts, the class token untouched, temporal locality of the depth-wise 3D
convolution, frames from the context, and training on moving-digit clips where only temporal
modelling can tell the direction of motion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.context import use
from petlsearch.plugins.st_adapter import STAdapter, clips_from_images
from petlsearch.plugins.checks import _perturb
from petlsearch.searchspace.graph import ModelGraph


def _vit(num_labels: int = 3):
    model = tiny.vit(num_labels=num_labels)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ModelGraph.from_model(model)


def test_sites_are_vision_blocks_only():
    plugin = STAdapter()
    assert [s.name for s in plugin.sites(ModelGraph.from_model(tiny.clip()))] == ["vision.L0", "vision.L1"]
    assert plugin.sites(ModelGraph.from_model(tiny.bert())) == []


@pytest.mark.parametrize("width,kt", [(8, 3), (5, 1), (16, 5)])
def test_count_by_formula(width, kt):
    plugin = STAdapter()
    model, graph = _vit()
    site = plugin.sites(graph)[0]
    cfg = plugin.config(site, {"bottleneck": width, "kernel_t": kt})
    c = 32
    assert plugin.count(site, cfg) == 2 * c * width + width + c + width * kt + width
    module = plugin.attach(model, site, cfg)
    assert module.trainable_count() == plugin.count(site, cfg)
    assert tuple(module.conv.weight.shape) == (width, 1, kt, 1, 1)  # depth-wise, time only


def _module(frames: int | None = 2, kt: int = 3):
    plugin = STAdapter(frames=frames)
    model, graph = _vit()
    module = plugin.attach(model, plugin.sites(graph)[0], {"bottleneck": 8, "kernel_t": kt})
    _perturb(module)
    return module


def test_class_token_untouched_and_patches_changed():
    module = _module()
    x = torch.randn(4, 17, 32)  # 2 clips x 2 frames, CLS + 4x4 patches
    delta = module.delta(x)
    assert torch.equal(delta[:, 0], torch.zeros(4, 32))
    assert delta[:, 1:].abs().sum() > 0


def test_convolution_mixes_neighbouring_frames_of_one_clip_only():
    module = _module(frames=4, kt=3)
    x = torch.randn(8, 17, 32)  # 2 clips of 4 frames
    y = x.clone()
    y[0, 5] += 1.0  # one patch token of frame 0 of clip 0
    changed = (module.delta(y) - module.delta(x)).abs().sum(-1) > 1e-7  # (8, 17)
    assert changed[0, 5] and changed[1, 5]  # itself and the next frame, same position
    assert not changed[2:].any()  # frames 2, 3 of clip 0 and all of clip 1
    assert changed[:2].sum() == 2  # kernel 1x1 in space: no other position


def test_frames_from_context_and_errors():
    module = _module(frames=None)
    x = torch.randn(6, 17, 32)
    with use(frames=3):
        three = module.delta(x)
    one = module.delta(x)  # no frames given: every image is its own clip
    assert not torch.allclose(three, one)
    with use(frames=4), pytest.raises(PluginError, match="whole number of clips"):
        module.delta(x)
    with pytest.raises(PluginError, match="square grid"):
        module.delta(torch.randn(2, 16, 32))


def test_clips_from_images_moves_the_image():
    images = torch.zeros(1, 1, 4, 6)
    images[0, 0, 1, 2] = 1.0
    clips, labels = clips_from_images(images, torch.tensor([7]), frames=3, shift=1)
    assert clips.shape == (1, 3, 1, 4, 6) and labels.tolist() == [7]
    cols = [int(clips[0, t, 0, 1].argmax()) for t in range(3)]
    assert cols == [1, 2, 3]  # centred on the original position, moving right
    back, _ = clips_from_images(images, torch.tensor([7]), frames=3, shift=-1)
    assert torch.equal(back, clips.flip(1))


def _digit_clips(n: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n digits (sklearn, 8x8 upsampled to the tiny ViT's 16x16) moving right (label 0) and the same
    clips played backwards (label 1): identical frames, only their order differs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32) / 16
    images = F.interpolate(images[:, None], size=16, mode="nearest").expand(-1, 3, -1, -1)
    clips, _ = clips_from_images(images, torch.tensor(digits.target[:n]), frames, shift=2)
    return torch.cat([clips, clips.flip(1)]), torch.arange(2).repeat_interleave(n)


def _train_direction(kernel_t: int, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    frames = 4
    clips, labels = _digit_clips(16, frames)
    model, graph = _vit(num_labels=2)
    model.classifier.requires_grad_(True)
    plugin = STAdapter()
    for site in plugin.sites(graph):
        plugin.attach(model, site, {"bottleneck": 16, "kernel_t": kernel_t})
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        with use(frames=frames):
            logits = model(pixel_values=clips.flatten(0, 1)).logits  # (B*T, 2)
        loss = F.cross_entropy(logits.view(len(clips), frames, -1).mean(1), labels)  # clip = mean of frames
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_learns_the_direction_of_motion_only_with_a_temporal_kernel():
    temporal = _train_direction(kernel_t=3)
    assert min(temporal[-5:]) < 0.66 < temporal[0]
    # kernel_t=1 sees each frame alone: a clip and its reverse give the same logits, so the loss
    # cannot fall below chance
    static = _train_direction(kernel_t=1)
    assert min(static) >= math.log(2) - 1e-4

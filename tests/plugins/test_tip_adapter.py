"""Tip-Adapter: the cache built from a frozen model's pooled features, exact counts, alpha / gate 0
give the head's logits, and few-shot digits: the training-free cache classifies its own shots and
matches a linear probe trained on the same shots; Tip-Adapter-F's keys train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import PluginError
from petlsearch.plugins import _tiny as tiny
from petlsearch.plugins.testing import applicable_families
from petlsearch.plugins.tip_adapter import TipAdapter
from petlsearch.searchspace.graph import ModelGraph

SHOTS = 8


class RandomFeatureNet(nn.Module):
    """A frozen encoder with pooled features into a head: a fixed random tanh layer over the pixels,
    which keeps the digits' geometry (a tiny random ViT's class tokens are nearly parallel)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.Tanh())
        self.classifier = nn.Linear(256, 10)
        nn.init.zeros_(self.classifier.weight)  # a head that knows nothing yet: the logits are the
        nn.init.zeros_(self.classifier.bias)  # cache's (CLIP's zero-shot head in the paper)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(pixel_values.flatten(1)))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.eval().parameters():
        p.requires_grad_(False)
    return model


def _shots(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first SHOTS examples of each class, in class order (the order prepare caches them in)."""
    xs = torch.cat([x[y == c][:SHOTS] for c in range(10)])
    return xs, torch.arange(10).repeat_interleave(SHOTS)


@pytest.fixture()
def cached(digits):
    x, y = digits
    net = _frozen(RandomFeatureNet())
    plugin = TipAdapter(max_shots=SHOTS)
    with pytest.warns(UserWarning, match="no repeated blocks"):
        plugin.prepare(net, [{"pixel_values": x[:300], "labels": y[:300]}, {"pixel_values": x[300:500], "labels": y[300:500]}])
        site = plugin.sites(ModelGraph.from_model(net))[0]
    return net, plugin, site


def test_sites_are_classifier_heads_not_lm_heads():
    assert applicable_families(TipAdapter()) == ["bert", "vit"]


def test_counts(cached):
    net, plugin, site = cached
    assert plugin.count(site, plugin.config(site, {})) == 0
    cfg = plugin.config(site, {"shots": 4, "finetune_keys": True})
    assert plugin.count(site, cfg) == 4 * 10 * 256
    plugin.attach(net, site, cfg)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 4 * 10 * 256


def test_cache_holds_normalised_shots_in_class_order(cached, digits):
    net, plugin, site = cached
    x, y = digits
    module = plugin.attach(net, site, {"shots": SHOTS})
    xs, ys = _shots(x[:500], y[:500])
    expected = F.normalize(net.encoder(xs.flatten(1)), dim=-1)
    assert torch.allclose(module.cache_keys, expected, atol=1e-6)
    assert torch.equal(module.cache_values, F.one_hot(ys, 10).float())


def test_alpha_zero_and_gate_zero_give_the_head_logits(cached, digits):
    net, plugin, site = cached
    x, _ = digits
    head = net(x[1000:1100])
    module = plugin.attach(net, site, {"alpha": 0.0})
    assert torch.equal(net(x[1000:1100]), head)
    module.uninstall()
    module = plugin.attach(net, site, {"alpha": 3.0})
    assert not torch.allclose(net(x[1000:1100]), head)
    module.gate = torch.tensor(0.0)
    assert torch.equal(net(x[1000:1100]), head)


def test_cache_classifies_its_own_shots_and_matches_a_linear_probe(cached, digits):
    net, plugin, site = cached
    x, y = digits
    xs, ys = _shots(x[:500], y[:500])
    test_x, test_y = x[1000:], y[1000:]
    head_acc = (net(test_x).argmax(1) == test_y).float().mean()
    plugin.attach(net, site, {"shots": SHOTS, "alpha": 10.0, "beta": 50.0})
    assert torch.equal(net(xs).argmax(1), ys)
    tip_acc = (net(test_x).argmax(1) == test_y).float().mean()
    # a linear probe trained on the same 80 shots and the same frozen features
    probe = nn.Linear(256, 10)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    feats = net.encoder(xs.flatten(1))
    for _ in range(200):
        loss = F.cross_entropy(probe(feats), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe_acc = (probe(net.encoder(test_x.flatten(1))).argmax(1) == test_y).float().mean()
    assert head_acc < 0.2 and tip_acc > 0.8 and tip_acc >= probe_acc - 0.02


def test_tip_adapter_f_trains_the_keys_only(cached, digits):
    net, plugin, site = cached
    x, y = digits
    xs, ys = _shots(x[:500], y[:500])
    module = plugin.attach(net, site, {"shots": SHOTS, "finetune_keys": True})
    values = module.cache_values.clone()
    opt = torch.optim.AdamW([module.cache_keys], lr=1e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(module.cache_values, values)


def test_missing_classes_leave_empty_slots(caplog):
    net = _frozen(tiny.vit(num_labels=3))
    plugin = TipAdapter(max_shots=4)
    pixels = torch.randn(3, 3, 16, 16)
    plugin.prepare(net, [{"pixel_values": pixels, "labels": torch.tensor([0, 0, 2])}])
    site = plugin.sites(ModelGraph.from_model(net))[0]
    module = plugin.attach(net, site, {"shots": 4})
    assert module.cache_values.sum(0).tolist() == [2.0, 0.0, 1.0]
    assert "9 of 12 cache slots are empty" in caplog.text
    # the ViT's head reads the class token after the final layer norm
    cls = net.vit(pixels).last_hidden_state[:, 0]
    assert torch.allclose(module.cache_keys[:2], F.normalize(cls[:2], dim=-1), atol=1e-6)


def test_errors_without_labels_or_prepare():
    net = _frozen(tiny.vit())
    plugin = TipAdapter()
    site = plugin.sites(ModelGraph.from_model(net))[0]
    with pytest.raises(PluginError, match="prepare"):
        plugin.attach(net, site)
    with pytest.raises(PluginError, match="labelled"):
        plugin.prepare(net, [tiny.inputs("vit")])

"""Data-driven scores: Fisher and SNIP against hand-computed gradients, output taps, intrinsic dimension."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from petlsearch import scoring
from petlsearch.errors import TaskError


class Toy(nn.Module):
    """x -> fc2(tanh(fc1(x))) with a cross-entropy loss when labels are given; `unused` never runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.fc2(torch.tanh(self.fc1(x)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def _batches(n: int = 2, size: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(size, 3, generator=g), "labels": torch.randint(0, 2, (size,), generator=g)}
            for _ in range(n)]


def _grad(model: Toy, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = model.fc1.weight
    return torch.autograd.grad(model(x, y).loss, [w])[0]


def test_fisher_per_sample_is_mean_squared_sample_gradient():
    model, batches = Toy(), _batches()
    for p in model.parameters():
        p.requires_grad_(False)
    scores = scoring.fisher_scores(model, batches, params=["fc1.weight"])
    model.fc1.weight.requires_grad_(True)
    manual = torch.stack([_grad(model, b["x"][i:i + 1], b["labels"][i:i + 1]) ** 2
                          for b in batches for i in range(3)]).mean(0)
    assert torch.allclose(scores["fc1.weight"], manual, atol=1e-7)
    model.fc1.weight.requires_grad_(False)
    scoring.fisher_scores(model, batches)
    assert not any(p.requires_grad for p in model.parameters())


def test_fisher_per_batch_and_sample_limit():
    model, batches = Toy(), _batches()
    per_batch = scoring.fisher_scores(model, batches, params=["fc1.weight"], per_sample=False)
    manual = torch.stack([_grad(model, b["x"], b["labels"]) ** 2 for b in batches]).mean(0)
    assert torch.allclose(per_batch["fc1.weight"], manual, atol=1e-7)
    first = scoring.fisher_scores(model, batches, params=["fc1.weight"], num_samples=1)
    assert torch.allclose(first["fc1.weight"], _grad(model, batches[0]["x"][:1], batches[0]["labels"][:1]) ** 2)


def test_fisher_without_labels_uses_sampled_labels():
    model = Toy()
    unlabelled = [{"x": b["x"]} for b in _batches()]
    scores = scoring.fisher_scores(model, unlabelled)
    assert set(scores) == {n for n, _ in model.named_parameters()}
    assert scores["fc1.weight"].sum() > 0
    assert torch.equal(scores["unused.weight"], torch.zeros(2, 2))  # no gradient reaches it
    with pytest.raises(TaskError, match="no parameter"):
        scoring.fisher_scores(model, unlabelled, params=["nope.weight"])


def test_snip_is_weight_times_summed_gradient():
    model, batches = Toy(), _batches()
    scores = scoring.snip_scores(model, batches, params=["fc1.weight"])
    g = sum(_grad(model, b["x"], b["labels"]) for b in batches)
    assert torch.allclose(scores["fc1.weight"], (model.fc1.weight * g).abs().detach(), atol=1e-7)


def test_output_taps_match_autograd_and_sample_tokens():
    model, batches = Toy(), _batches()
    taps = scoring.output_taps(model, batches, ["fc1"], max_tokens=100)
    h, g = taps["fc1"]
    out = torch.cat([model.fc1(b["x"]) for b in batches]).detach()
    grads = []
    for b in batches:
        hidden = model.fc1(b["x"]).detach().requires_grad_()
        loss = F.cross_entropy(model.fc2(torch.tanh(hidden)), b["labels"])
        grads.append(torch.autograd.grad(loss, hidden)[0])
    # rows come back in a random order: compare as sets of (h, g) rows
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert torch.allclose(order(torch.cat([h, g], 1)), order(torch.cat([out, torch.cat(grads)], 1)), atol=1e-6)
    small = scoring.output_taps(model, batches, ["fc1"], max_tokens=4)["fc1"]
    assert small[0].shape == (4, 4) and small[1].shape == (4, 4)


def test_local_intrinsic_dimension():
    model, batches = Toy(), _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    easy = scoring.local_intrinsic_dimension(model, batches, ["fc2", "unused"], dims=(1, 2, 4),
                                             threshold=0.0, steps=5, lr=0.05)
    assert easy["fc2"].dimension == 1 and easy["fc2"].full_gain > 0
    assert easy["fc2"].num_params == 10 and set(easy["fc2"].gains) == {1, 2, 4}
    assert easy["unused"].dimension is None and easy["unused"].full_gain == 0
    hard = scoring.local_intrinsic_dimension(model, batches, ["fc2"], dims=(1, 2), threshold=10.0, steps=5)
    assert hard["fc2"].dimension is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # never changed
    with pytest.raises(TaskError, match="labels"):
        scoring.local_intrinsic_dimension(model, [{"x": batches[0]["x"]}], ["fc2"])


def test_split_samples_keeps_non_batch_values():
    batch = {"x": torch.zeros(3, 2), "flag": torch.tensor(1.0), "other": "text"}
    parts = list(scoring.split_samples(batch))
    assert len(parts) == 3 and parts[0]["x"].shape == (1, 2) and parts[0]["other"] == "text"


def test_scores_ignore_dropout_and_keep_the_models_mode():
    from petlsearch.plugins import _tiny as tiny

    model = tiny.bert()  # hidden and attention dropout 0.1
    model.train()
    batch = {**tiny.inputs("bert"), "labels": torch.tensor([0, 1])}
    name = next(n for n, _ in model.named_parameters() if n.endswith("query.weight"))
    first = scoring.fisher_scores(model, [batch], params=[name])[name]
    torch.manual_seed(123)  # another dropout draw would change train-mode gradients
    second = scoring.fisher_scores(model, [batch], params=[name])[name]
    assert torch.equal(first, second) and model.training

"""Data-driven scores of a frozen model's parameters and submodules, reusable as zero-cost proxies.

- `fisher_scores`: the empirical Fisher information per parameter, the mean of squared gradients of
  the loss over N samples (per sample, as in FISH, Sung et al., NeurIPS 2021; or per batch).
- `snip_scores`: SNIP connection sensitivity |w * dL/dw| (Lee et al., ICLR 2019).
- `output_taps`: a site's output and the loss gradient there, so that scores of a module that does
  not exist yet (an adapter added at that output) can be computed later (SparseAdapter's SNIP).
- `local_intrinsic_dimension`: per submodule, the smallest dimension d of a random subspace
  theta = theta_0 + P z (z in R^d) whose training reaches a threshold of the loss reduction that a
  full update of the submodule reaches (He et al., "Parameter-efficient Model Adaptation for Vision
  Transformers", AAAI 2023; after Li et al., "Measuring the Intrinsic Dimension", ICLR 2018).

Every function takes a model, an iterable of batches (dicts accepted by `model(**batch)`) and an
optional `loss(output, batch) -> scalar`. By default the loss is the output's `.loss` (batches with
'labels'); Fisher and SNIP fall back, when the output has no loss, to the cross-entropy against
labels sampled from the model's own prediction (the model Fisher), so they also work unlabelled.

Example::

    from petlsearch.scoring import fisher_scores
    scores = fisher_scores(model, batches, num_samples=256)   # {param name: tensor like the param}
    top = scores["bert.encoder.layer.0.attention.self.query.weight"].flatten().topk(100).indices
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from petlsearch.errors import TaskError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Loss = Callable[[Any, Batch], torch.Tensor]


# ---------------------------------------------------------------------------- losses and batches
def output_loss(output: Any, batch: Batch) -> torch.Tensor:
    """The loss the model computed itself (the batch must hold 'labels')."""
    loss = getattr(output, "loss", None)
    if loss is None:
        raise TaskError("the model returned no loss: give batches with 'labels' or pass loss=fn(output, batch)")
    return loss


def logits_of(output: Any) -> torch.Tensor:
    """The main prediction tensor of a model output (logits, or CLIP's image-text logits)."""
    for name in ("logits", "logits_per_image"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def sampled_label_loss(output: Any, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy against labels drawn from the model's own predictive distribution: its
    squared gradients estimate the true (model) Fisher when no labels are given."""
    logits = logits_of(output).float()
    flat = logits.reshape(-1, logits.shape[-1])  # (N, classes)
    with torch.no_grad():
        labels = torch.multinomial(flat.softmax(-1), 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)


def _loss_fn(loss: Loss | None, fallback: bool, seed: int = 0) -> Loss:
    if loss is not None:
        return loss
    generator = torch.Generator().manual_seed(seed)

    def default(output: Any, batch: Batch) -> torch.Tensor:
        value = getattr(output, "loss", None)
        if value is not None or not fallback:
            return output_loss(output, batch)
        g = generator if logits_of(output).device.type == "cpu" else None
        return sampled_label_loss(output, g)

    return default


def batch_size(batch: Batch) -> int:
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not sizes:
        raise TaskError("a batch holds no tensors; expected a dict like {'input_ids': (B, T), ...}")
    return sizes[0]


def split_samples(batch: Batch) -> Iterator[Batch]:
    """The batch as single-example batches (tensors whose first dim is the batch size are sliced)."""
    n = batch_size(batch)
    for i in range(n):
        yield {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
               for k, v in batch.items()}


def _units(batches: Iterable[Batch], per_sample: bool, num_samples: int | None) -> Iterator[Batch]:
    """The batches (or their samples) to take gradients on, up to `num_samples` examples."""
    seen = 0
    for batch in batches:
        for unit in (split_samples(batch) if per_sample else (batch,)):
            if num_samples is not None and seen >= num_samples:
                return
            seen += batch_size(unit)
            yield unit


def _device_batch(batch: Batch, device: torch.device) -> Batch:
    """On the model's device, contiguous (some models view() their labels)."""
    return {k: v.to(device).contiguous() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _requiring_grad(params: list[nn.Parameter]) -> Iterator[None]:
    """Let autograd reach frozen parameters for the duration, then restore their flags."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _select(model: nn.Module, params: Iterable[str] | None) -> dict[str, nn.Parameter]:
    if params is None:
        return {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    chosen = {}
    for name in params:  # get_parameter also finds tied weights under their second name
        try:
            chosen[name] = model.get_parameter(name)
        except AttributeError as exc:
            raise TaskError(f"no parameter '{name}' in {type(model).__name__}") from exc
    return chosen


def _gradients(model: nn.Module, chosen: dict[str, nn.Parameter], units: Iterable[Batch],
               loss_fn: Loss) -> Iterator[list[torch.Tensor | None]]:
    device = _device(model)
    unique = list({id(p): p for p in chosen.values()}.values())  # tied weights once
    position = {id(p): i for i, p in enumerate(unique)}
    training = model.training
    model.eval()  # scores of the model's deterministic function: no dropout noise, reproducible masks
    try:
        with _requiring_grad(unique):
            for unit in units:
                unit = _device_batch(unit, device)
                loss = loss_fn(model(**unit), unit)
                grads = torch.autograd.grad(loss, unique, allow_unused=True)
                yield [grads[position[id(p)]] for p in chosen.values()]
    finally:
        model.train(training)


# ---------------------------------------------------------------------------- parameter scores
def fisher_scores(model: nn.Module, batches: Iterable[Batch], loss: Loss | None = None,
                  params: Iterable[str] | None = None, num_samples: int | None = None,
                  per_sample: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Empirical Fisher per parameter: mean over samples (or batches) of (dL/dw)^2, in float32.

    `params` names the parameters to score (default: every floating parameter); `num_samples`
    caps the examples used (FISH uses 1024). Frozen parameters are scored too. A loss defined over
    the whole batch (CLIP's contrastive loss) needs `per_sample=False`.
    """
    chosen = _select(model, params)
    total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in chosen.items()}
    count = 0
    for grads in _gradients(model, chosen, _units(batches, per_sample, num_samples), _loss_fn(loss, True, seed)):
        count += 1
        for (name, acc), g in zip(total.items(), grads):
            if g is not None:
                acc += g.detach().float() ** 2
    if count == 0:
        raise TaskError("fisher_scores got no batches")
    log.debug("Fisher over %d %s", count, "samples" if per_sample else "batches")
    return {n: t / count for n, t in total.items()}


def snip_scores(model: nn.Module, batches: Iterable[Batch], loss: Loss | None = None,
                params: Iterable[str] | None = None, num_samples: int | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """SNIP saliency |w * dL/dw|, with the gradient summed over the batches (float32)."""
    chosen = _select(model, params)
    total = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in chosen.items()}
    for grads in _gradients(model, chosen, _units(batches, False, num_samples), _loss_fn(loss, True, seed)):
        for acc, g in zip(total.values(), grads):
            if g is not None:
                acc += g.detach().float()
    return {n: (chosen[n].detach().float() * g).abs() for n, g in total.items()}


# ---------------------------------------------------------------------------- output taps
def output_taps(model: nn.Module, batches: Iterable[Batch], paths: Iterable[str], loss: Loss | None = None,
                max_tokens: int = 1024, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each module path: (H, G), a uniform sample of at most `max_tokens` rows of the module's
    output H (tokens, features) and of the loss gradient G at that output (same shape).

    A module later added at that output as h + f(h) has, to first order (at gate -> 0), the
    gradient dL/dtheta = sum_t G_t df(H_t)/dtheta: enough for SNIP of a module not built yet.
    """
    paths = list(paths)
    loss_fn = _loss_fn(loss, True, seed)
    keys_gen = torch.Generator().manual_seed(seed)
    kept: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    device = _device(model)
    for batch in batches:
        outs: dict[str, torch.Tensor] = {}
        zero = torch.zeros((), device=device, requires_grad=True)  # puts every tap on the graph

        def tap(path: str) -> Callable[..., Any]:
            def hook(_mod: nn.Module, _args: tuple, out: Any) -> Any:
                tensor = out[0] if isinstance(out, tuple) else out
                tensor = tensor + zero.to(tensor.dtype)
                outs[path] = tensor
                return (tensor, *out[1:]) if isinstance(out, tuple) else tensor
            return hook

        handles = [model.get_submodule(p).register_forward_hook(tap(p)) for p in paths]
        try:
            with torch.enable_grad():
                batch = _device_batch(batch, device)
                value = loss_fn(model(**batch), batch)
                order = [p for p in paths if p in outs]
                grads = torch.autograd.grad(value, [outs[p] for p in order], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        for p, g in zip(order, grads):
            h = outs[p].detach()
            g = torch.zeros_like(h) if g is None else g.detach()
            _reservoir(kept, p, h.reshape(-1, h.shape[-1]).float().cpu(), g.reshape(-1, g.shape[-1]).float().cpu(),
                       max_tokens, keys_gen)
    return {p: (h, g) for p, (h, g, _) in kept.items()}


def _reservoir(kept: dict, path: str, h: torch.Tensor, g: torch.Tensor, size: int, gen: torch.Generator) -> None:
    """Keep the `size` rows with the smallest random keys: a uniform sample over all batches."""
    keys = torch.rand(h.shape[0], generator=gen)
    if path in kept:
        h0, g0, k0 = kept[path]
        h, g, keys = torch.cat([h0, h]), torch.cat([g0, g]), torch.cat([k0, keys])
    if keys.numel() > size:
        idx = keys.topk(size, largest=False).indices
        h, g, keys = h[idx], g[idx], keys[idx]
    kept[path] = (h, g, keys)


# ---------------------------------------------------------------------------- intrinsic dimension
@dataclass
class IntrinsicDimension:
    """The local intrinsic dimension of one submodule: the smallest tried d whose subspace training
    reduces the loss by at least `threshold` x the full update's reduction (None if none did)."""

    submodule: str
    dimension: int | None
    num_params: int
    full_gain: float
    gains: dict[int, float] = field(default_factory=dict)


def local_intrinsic_dimension(model: nn.Module, batches: Iterable[Batch], submodules: Iterable[str],
                              dims: tuple[int, ...] = (1, 2, 4, 8, 16, 32), threshold: float = 0.9,
                              steps: int = 10, lr: float = 5e-3, loss: Loss | None = None,
                              seed: int = 0) -> dict[str, IntrinsicDimension]:
    """One-shot local intrinsic dimension of each submodule (a module path).

    For each submodule, its parameters are trained alone for `steps` Adam steps on the batches:
    once as a full update, and once per d in `dims` as theta_0 + P z with a fixed random P
    (D x d, entries N(0, 1/d)); the gain is the drop of the mean loss over the batches. The model
    itself is left unchanged (its parameters are swapped for the trial tensors). Needs a real loss: labelled batches or
    `loss`. A dense P costs D x max(dims) floats, so keep `dims` small for large submodules.
    """
    batches = [_device_batch(b, _device(model)) for b in batches]
    if not batches:
        raise TaskError("local_intrinsic_dimension got no batches")
    loss_fn = loss or output_loss
    base_loss = _mean_loss(model, batches, {}, loss_fn)
    results = {}
    for path in submodules:
        base = {f"{path}.{n}" if path else n: p.detach()
                for n, p in model.get_submodule(path).named_parameters() if p.is_floating_point()}
        full = base_loss - _train_subspace(model, batches, base, None, steps, lr, loss_fn, seed)
        gains = {d: base_loss - _train_subspace(model, batches, base, d, steps, lr, loss_fn, seed)
                 for d in sorted(dims)}
        reached = [d for d, gain in gains.items() if full > 0 and gain >= threshold * full]
        results[path] = IntrinsicDimension(path, reached[0] if reached else None,
                                           sum(t.numel() for t in base.values()), full, gains)
        log.info("intrinsic dimension of %s: %s (full gain %.4g)", path, results[path].dimension, full)
    return results


@contextlib.contextmanager
def _swapped(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the model with some parameters replaced by tensors (differentiable in those tensors);
    each key keeps its place, so the model is exactly as before afterwards."""
    saved = []
    try:
        for name, tensor in tensors.items():
            module_path, _, attr = name.rpartition(".")
            module = model.get_submodule(module_path)
            saved.append((module, attr, module._parameters[attr]))
            module._parameters[attr] = tensor  # type: ignore[assignment]
        yield
    finally:
        for module, attr, param in reversed(saved):
            module._parameters[attr] = param


def _mean_loss(model: nn.Module, batches: list[Batch], params: dict[str, torch.Tensor], loss_fn: Loss) -> float:
    with torch.no_grad(), _swapped(model, params):
        return sum(float(loss_fn(model(**b), b)) for b in batches) / len(batches)


def _train_subspace(model: nn.Module, batches: list[Batch], base: dict[str, torch.Tensor], d: int | None,
                    steps: int, lr: float, loss_fn: Loss, seed: int) -> float:
    """Train the update of `base` (full if d is None, else in a random d-dim subspace); final loss."""
    g = torch.Generator().manual_seed(seed)
    if d is None:
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in base.items()}
        trainable = list(deltas.values())

        def params() -> dict[str, torch.Tensor]:
            return {n: w + deltas[n] for n, w in base.items()}
    else:
        z = torch.zeros(d, device=next(iter(base.values())).device, requires_grad=True)
        proj = {n: (torch.randn(w.numel(), d, generator=g) / math.sqrt(d)).to(w) for n, w in base.items()}
        trainable = [z]

        def params() -> dict[str, torch.Tensor]:
            return {n: w + (proj[n] @ z.to(w.dtype)).view_as(w) for n, w in base.items()}

    opt = torch.optim.Adam(trainable, lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            b = batches[step % len(batches)]
            opt.zero_grad()
            with _swapped(model, params()):
                loss_fn(model(**b), b).backward()
            opt.step()
    with torch.no_grad():
        final = params()
    return _mean_loss(model, batches, final, loss_fn)

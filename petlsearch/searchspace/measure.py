"""Training memory measured on a real step: the ground truth the memory model (`memory.estimate`) is
tested against. CPU: the bytes autograd saves, each storage once, plus parameters, gradients and
optimizer state; CUDA: the allocator's peak over one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class MeasuredMemory:
    """Bytes of one training step, measured. On CPU the parts add up to `total`; on CUDA `total` is
    the allocator's peak and `activations` is what remains of it after the other parts."""

    total: int
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    device: str = "cpu"

    @property
    def trainable_state(self) -> int:
        return self.gradients + self.optimizer_state


def step_loss(out: Any) -> torch.Tensor:
    """The scalar a step minimises: the model's own loss, else the mean square of its main output."""
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    for name in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value.float().pow(2).mean()
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.float().pow(2).mean()


def measure(model: nn.Module, batch: dict[str, Any], params: list[torch.nn.Parameter] | None = None,
            optimizer: str = "adamw") -> MeasuredMemory:
    """Memory of one forward / backward / optimizer step of `model` (in train mode) on `batch`.

    `params` are the parameters trained (default: those with requires_grad); their gradients are
    cleared afterwards. CPU: the bytes autograd saves for backward, each storage once (parameters
    are weights, not activations), plus weights, gradients and optimizer state. CUDA: the peak the
    allocator sees over the step, on top of what was resident before it, plus the weights.
    """
    import torch

    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("measure: nothing to train; pass params or set requires_grad on some parameters")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"measure: unknown optimizer {optimizer!r}; valid: 'adamw', 'sgd'")
    cuda = params[0].device.type == "cuda"
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage data_ptr -> bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        opt = torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw" else torch.optim.SGD(params, lr=1e-4)
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step_loss(model(**batch))
        loss.backward()
        opt.step()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v))
        if cuda:
            torch.cuda.synchronize()
            total = torch.cuda.max_memory_allocated() - base + weights
            return MeasuredMemory(total, weights, grads, state, max(0, total - weights - grads - state), "cuda")
        activations = sum(saved.values())
        return MeasuredMemory(weights + grads + state + activations, weights, grads, state, activations, "cpu")
    finally:
        model.train(was_training)
        for p in params:
            p.grad = None

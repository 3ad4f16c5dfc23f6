"""Perturbations of the input embeddings: norms, ascent steps, projections and the PGD attack.

Shared by the adversarial training regimes (`regimes/adversarial.py`) and the robustness evaluation
(`callbacks/robustness.py`). Tensors are (B, T, H): batch, tokens, embedding width.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

from lightning_modules.task import Batch

if TYPE_CHECKING:
    from lightning_modules.module import TaskModule

Norm = Literal["l2", "linf"]


def perturbation_norms(delta: Tensor, norm: Norm = "l2", per_example: bool = True) -> Tensor:
    """Norm of a (B, T, H) perturbation: per example (shape (B, 1, 1)) or over the whole batch (scalar)."""
    flat = (delta.flatten(1) if per_example else delta.reshape(1, -1)).float()  # fp16 would round tiny norms to 0
    n = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return n.view(-1, 1, 1) if per_example else n.view(())


def ascent_direction(grad: Tensor, norm: Norm = "l2", per_example: bool = True) -> Tensor:
    """Steepest ascent direction of unit size: g / ||g||_2 (L2) or sign(g) (L-inf)."""
    if norm == "linf":
        return grad.sign()
    return (grad.float() / perturbation_norms(grad, "l2", per_example).clamp_min(1e-12)).to(grad.dtype)


def project(delta: Tensor, eps: float, norm: Norm = "l2", per_example: bool = True) -> Tensor:
    """Project onto the eps-ball: rescale (L2) or clamp (L-inf)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = perturbation_norms(delta, "l2", per_example)
    return delta * (eps / n.clamp_min(1e-12)).clamp(max=1.0).to(delta.dtype)


def random_start(like: Tensor, mask: Tensor, eps: float, norm: Norm = "l2", per_example: bool = True) -> Tensor:
    """A uniform random point in the eps-ball (L-inf) or on a random direction of norm <= eps (L2)."""
    noise = (torch.rand_like(like) * 2 - 1) * mask
    if norm == "linf":
        return noise * eps
    scale = torch.rand(like.shape[0] if per_example else 1, device=like.device, dtype=like.dtype).view(-1, 1, 1)
    return ascent_direction(noise, "l2", per_example) * eps * scale


def token_mask(batch: Batch, like: Tensor) -> Tensor:
    """(B, T, 1) mask of real (non-padding) positions."""
    return batch["attention_mask"].unsqueeze(-1).to(like.dtype)


def embed(module: "TaskModule", batch: Batch) -> Tensor:
    """The output of the model's input-embedding layer for the batch's `input_ids`."""
    return module.model.get_input_embeddings()(batch["input_ids"])


def grad_scale(module: "TaskModule") -> float:
    """The fp16 loss scale, so gradients taken inside the loss do not underflow (1 otherwise)."""
    trainer = module._trainer
    scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def input_grad(loss: Tensor, delta: Tensor, module: "TaskModule") -> Tensor:
    """Gradient of `loss` for the perturbation only (no parameter gradients are formed)."""
    scale = grad_scale(module)
    (g,) = torch.autograd.grad(loss * scale, [delta])
    return g / scale


def pgd_attack(loss_at: Callable[[Tensor], Tensor], grad_of: Callable[[Tensor, Tensor], Tensor], like: Tensor,
               mask: Tensor, clean_grad: Tensor | None, eps: float, steps: int, step_size: float, norm: Norm = "l2",
               per_example: bool = True, random_init: bool = False, keep_worst: bool = False) -> Tensor:
    """The PGD perturbation (detached, shaped like the (B, T, H) `like`) after `steps` projected ascent
    steps on `loss_at(delta)`. `clean_grad`, the loss gradient at delta = 0 if already known, saves a forward.

    With `keep_worst`, `loss_at` returns per-example losses (B,) and the result is, per example, the iterate
    (the start and the final one included, which costs one more forward) with the highest loss: an attack
    that never helps an example and whose overshooting steps do not count.
    """
    delta = random_start(like, mask, eps, norm, per_example) if random_init else torch.zeros_like(like)
    best, best_loss = None, None
    for k in range(steps + 1):
        last = k == steps
        if last and not keep_worst:
            break
        if k == 0 and not random_init and clean_grad is not None and not keep_worst:
            g = clean_grad
        else:
            delta = delta.detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                loss = loss_at(delta)
            if keep_worst:
                losses = loss.detach().float()
                worse = torch.ones_like(losses, dtype=torch.bool) if best is None else losses > best_loss
                best = delta.detach().clone() if best is None else torch.where(worse.view(-1, 1, 1), delta.detach(), best)
                best_loss = losses if best_loss is None else torch.where(worse, losses, best_loss)
            if last:
                break
            g = grad_of(loss.sum(), delta)  # per-example losses: the sum gives each example its own gradient
        delta = project(delta.detach() + step_size * ascent_direction(g * mask, norm, per_example), eps, norm,
                        per_example) * mask
    return best if keep_worst else delta.detach()

"""Adversarial training on the input embeddings: FGM, PGD and FreeLB.

The regimes perturb the output of the model's input-embedding layer (the `inputs_embeds` the task's
forward accepts), never the embedding matrix, so they also work when PEFT freezes the embeddings.
Padding positions are never perturbed.

They run under Lightning's automatic optimization: the wrapper returns one loss and Lightning calls
backward on it once, so mixed precision, gradient accumulation, clipping and DDP work unchanged. The
perturbation direction needs the gradient of a loss the wrapper has already computed; that backward
also yields the parameters' gradients of that loss, and `InnerBackward` carries them into Lightning's
backward through a zero-valued term whose gradient they are. Each loss evaluation thus costs one
forward and one backward, as in the hand-written FGM/PGD loops that call backward twice: FGM about 2x
a plain step, PGD(K) about K+1 (its inner steps only differentiate the perturbation).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_modules.embedding_attacks import (Norm, ascent_direction, embed, grad_scale, input_grad, perturbation_norms,
                                                 pgd_attack, project, token_mask)
from lightning_modules.regime import Regime
from lightning_modules.task import Batch, LossFn, StepOutput

if TYPE_CHECKING:
    from lightning_modules.module import TaskModule

class _CarryGrads(torch.autograd.Function):
    """A zero scalar whose backward hands precomputed gradients to `params` (times the incoming scale,
    e.g. Lightning's 1 / accumulate_grad_batches or the fp16 loss scale)."""

    @staticmethod
    def forward(ctx, grads: list[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return (None, *(g * grad_out for g in ctx.grads))


class InnerBackward:
    """Backward passes a regime runs inside its loss, and the gradients they leave for Lightning's backward.

    `backward(loss, x)` returns d loss / d x (x: the embeddings or a perturbation of them) and adds the
    trainable parameters' gradients of `loss` to a running sum; `carry(embeds)` turns that sum into a
    zero-valued term of the final loss. The input-embedding matrix is not differentiated here: its
    gradient is d loss / d x scattered over the looked-up rows, which `carry` routes through `embeds`,
    the lookup the final loss uses (unless the matrix is tied to an output layer).
    """

    def __init__(self, module: "TaskModule") -> None:
        model = module.model
        weight = model.get_input_embeddings().weight
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.via_embeds = weight.requires_grad and (out is None or out.weight is not weight)
        self.params = [p for p in module.parameters() if p.requires_grad and not (self.via_embeds and p is weight)]
        self.scale = grad_scale(module)
        self.sums: list[Tensor | None] = [None] * len(self.params)
        self.embeds_grad: Tensor | None = None

    def backward(self, loss: Tensor, x: Tensor) -> Tensor:
        grads = torch.autograd.grad(loss * self.scale if self.scale != 1 else loss, [x, *self.params], allow_unused=True)
        if self.scale != 1:
            grads = [None if g is None else g / self.scale for g in grads]
        for i, g in enumerate(grads[1:]):
            if g is not None:
                self.sums[i] = g if self.sums[i] is None else self.sums[i].add_(g)
        g_x = torch.zeros_like(x) if grads[0] is None else grads[0]
        if self.via_embeds:
            self.embeds_grad = g_x if self.embeds_grad is None else self.embeds_grad + g_x
        return g_x

    def carry(self, embeds: Tensor) -> Tensor:
        pairs = [(p, g) for p, g in zip(self.params, self.sums) if g is not None]
        term = _CarryGrads.apply([g for _, g in pairs], *[p for p, _ in pairs]) if pairs else embeds.new_zeros(())
        if self.embeds_grad is not None and embeds.requires_grad:
            dot = (embeds * self.embeds_grad).sum()
            term = term + (dot - dot.detach())
        return term


class EmbeddingAdversary(Regime):
    """Shared checks and logging of the embedding-space regimes."""

    def __init__(self, norm: Norm = "l2", per_example: bool = True) -> None:
        if norm not in ("l2", "linf"):
            raise ValueError(f"{type(self).__name__}: norm must be 'l2' or 'linf', got '{norm}'.")
        self.norm, self.per_example = norm, per_example
        self.last_perturbation: Tensor | None = None  # the final perturbation of the latest step (detached)

    def wrap_loss(self, loss_fn: LossFn, module: "TaskModule") -> LossFn:
        def adversarial_loss(batch: Batch, inputs_embeds: Tensor | None = None) -> StepOutput:
            if inputs_embeds is not None:
                raise ValueError(f"{type(self).__name__}: another regime already perturbs the embeddings; "
                                 "use one adversarial regime per run.")
            return self.step(loss_fn, module, batch)

        return adversarial_loss

    def step(self, loss_fn: LossFn, module: "TaskModule", batch: Batch) -> StepOutput:
        raise NotImplementedError

    def _output(self, loss: Tensor, clean: StepOutput, adv_loss: Tensor, delta: Tensor) -> StepOutput:
        self.last_perturbation = delta.detach()
        norms = perturbation_norms(delta.detach().float(), self.norm, per_example=True)
        logs = {**clean.logs, "loss_clean": clean.loss.detach(), "loss_adv": adv_loss.detach(),
                "adv_norm": norms.mean()}
        return StepOutput(loss=loss, outputs=clean.outputs, logs=logs)


class FGM(EmbeddingAdversary):
    """Fast gradient method (Miyato et al. 2017): one step `r = eps * g / ||g||` on the embeddings.

    loss = clean + alpha * adversarial.

    Args:
        eps: size of the perturbation (L2 norm per example, or over the batch with per_example=False).
        alpha: weight of the adversarial loss.
        per_example: normalise each example's gradient on its own (default) or the batch's as a whole.
    """

    name = "fgm"

    def __init__(self, eps: float = 1.0, alpha: float = 1.0, per_example: bool = True) -> None:
        super().__init__("l2", per_example)
        if eps < 0 or alpha < 0:
            raise ValueError(f"FGM: eps and alpha must be >= 0, got eps={eps}, alpha={alpha}.")
        self.eps, self.alpha = eps, alpha

    def step(self, loss_fn: LossFn, module: "TaskModule", batch: Batch) -> StepOutput:
        embeds = embed(module, batch)
        if not embeds.requires_grad:  # frozen embeddings (PEFT): differentiate the lookup's output
            embeds.requires_grad_(True)
        mask = token_mask(batch, embeds)
        clean = loss_fn(batch, inputs_embeds=embeds)
        inner = InnerBackward(module)
        g = inner.backward(clean.loss, embeds)
        delta = self.eps * ascent_direction(g * mask, "l2", self.per_example) * mask
        adv_embeds = embed(module, batch)
        adv = loss_fn(batch, inputs_embeds=adv_embeds + delta.detach())
        loss = clean.loss.detach() + inner.carry(adv_embeds) + self.alpha * adv.loss
        return self._output(loss, clean, adv.loss, delta)


class PGD(EmbeddingAdversary):
    """Projected gradient descent (Madry et al. 2018) on the embeddings, as used for BERT fine-tuning.

    `steps` ascent steps of size `step_size`, each projected back into the eps-ball; the model is
    trained on clean + alpha * (loss at the final perturbation).

    Args:
        eps: radius of the ball (per example, or over the batch with per_example=False). K projected steps
            reach much stronger perturbations of a given radius than FGM's single step, so PGD's radius is
            smaller than FGM's (the README's adversarial benchmark measured where training breaks).
        steps: number of ascent steps K.
        step_size: size of one step; default 2.5 * eps / steps (Madry et al.).
        alpha: weight of the adversarial loss.
        norm: "l2" or "linf".
        random_start: start from a random point in the ball instead of the clean input.
    """

    name = "pgd"

    def __init__(self, eps: float = 0.25, steps: int = 3, step_size: float | None = None, alpha: float = 1.0,
                 norm: Norm = "l2", per_example: bool = True, random_start: bool = False) -> None:
        super().__init__(norm, per_example)
        if eps < 0 or alpha < 0 or steps < 1:
            raise ValueError(f"PGD: need eps >= 0, alpha >= 0 and steps >= 1 (got {eps}, {alpha}, {steps}).")
        self.eps, self.steps, self.alpha, self.random_start = eps, steps, alpha, random_start
        self.step_size = 2.5 * eps / steps if step_size is None else step_size

    def step(self, loss_fn: LossFn, module: "TaskModule", batch: Batch) -> StepOutput:
        embeds = embed(module, batch)
        if not embeds.requires_grad:
            embeds.requires_grad_(True)
        mask = token_mask(batch, embeds)
        clean = loss_fn(batch, inputs_embeds=embeds)
        inner = InnerBackward(module)
        g = inner.backward(clean.loss, embeds)

        clean_embeds = embeds.detach()

        def loss_at(delta: Tensor) -> Tensor:  # inner steps: only the perturbation is differentiated
            return loss_fn(batch, inputs_embeds=clean_embeds + delta).loss

        delta = pgd_attack(loss_at, lambda loss, d: input_grad(loss, d, module), clean_embeds, mask, g, self.eps, self.steps,
                           self.step_size, self.norm, self.per_example, self.random_start)
        adv_embeds = embed(module, batch)
        adv = loss_fn(batch, inputs_embeds=adv_embeds + delta)
        loss = clean.loss.detach() + inner.carry(adv_embeds) + self.alpha * adv.loss
        return self._output(loss, clean, adv.loss, delta)


class FreeLB(EmbeddingAdversary):
    """FreeLB (Zhu et al. 2020): `steps` adversarial ascent steps whose parameter gradients are averaged.

    The perturbation starts at random within `init_mag` (0: at the clean input), takes steps of size
    `adv_lr` along the normalised gradient and, with `max_norm` > 0, is projected into that ball. The
    training loss is the mean of the K adversarial losses. `train/loss_clean` comes from an extra
    forward pass without gradients (about a third of a plain step) unless init_mag is 0.

    Args:
        steps: number of ascent steps K.
        adv_lr: step size of the perturbation.
        init_mag: magnitude of the random start (L2: of the whole example's perturbation).
        max_norm: radius of the ball the perturbation is kept in; 0 = unbounded (as in the paper's GLUE runs).
        norm: "l2" or "linf".
    """

    name = "freelb"

    def __init__(self, steps: int = 3, adv_lr: float = 0.1, init_mag: float = 0.1, max_norm: float = 0.0,
                 norm: Norm = "l2") -> None:
        super().__init__(norm, per_example=True)
        if steps < 1 or adv_lr < 0 or init_mag < 0 or max_norm < 0:
            raise ValueError(f"FreeLB: need steps >= 1 and adv_lr, init_mag, max_norm >= 0 "
                             f"(got {steps}, {adv_lr}, {init_mag}, {max_norm}).")
        self.steps, self.adv_lr, self.init_mag, self.max_norm = steps, adv_lr, init_mag, max_norm

    def _init(self, embeds: Tensor, mask: Tensor) -> Tensor:
        if self.init_mag == 0:
            return torch.zeros_like(embeds)
        noise = (torch.rand_like(embeds) * 2 - 1) * mask
        if self.norm == "linf":
            return noise * self.init_mag
        dims = mask.sum(dim=(1, 2), keepdim=True) * embeds.shape[-1]  # real positions x width, as in FreeLB
        return noise * self.init_mag / dims.sqrt()

    def step(self, loss_fn: LossFn, module: "TaskModule", batch: Batch) -> StepOutput:
        embeds = embed(module, batch)
        mask = token_mask(batch, embeds)
        delta = self._init(embeds.detach(), mask)
        inner = InnerBackward(module)
        losses, first = [], None
        for k in range(self.steps):
            delta = delta.detach().requires_grad_(True)
            if k > 0:
                embeds = embed(module, batch)
            out = loss_fn(batch, inputs_embeds=embeds + delta)
            first = out if first is None else first
            losses.append(out.loss)
            if k == self.steps - 1:
                break
            g = inner.backward(out.loss / self.steps, delta) * mask
            if self.norm == "l2":
                step = ascent_direction(g, "l2", True)
            else:  # as FreeLB's code: g / max|g| per example
                step = g / perturbation_norms(g, "linf", True).clamp_min(1e-12)
            delta = delta.detach() + self.adv_lr * step
            if self.max_norm > 0:
                delta = project(delta, self.max_norm, self.norm, True)
            delta = delta * mask
        adv_mean = torch.stack([x.detach() for x in losses]).mean()
        loss = adv_mean - losses[-1].detach() / self.steps + losses[-1] / self.steps + inner.carry(embeds)
        if self.init_mag == 0:
            clean = first
        else:
            with torch.no_grad():
                clean = loss_fn(batch, inputs_embeds=embed(module, batch))
            clean = StepOutput(loss=clean.loss, outputs=first.outputs, logs=first.logs)
        return self._output(loss, clean, adv_mean, delta)

"""AdamW for the fine-tune cells, without torch.optim.

Why: every torch.optim optimizer imports torch._dynamo on construction and on its first step (its
methods are wrapped to switch dynamo off), about 1.8 s per process here, and each of the 42 fine-tune
cells is its own process that trains a small head for a few seconds. This is the same update as
torch.optim.AdamW with its defaults on CPU (the single-tensor path: decoupled weight decay, bias
correction, eps added after the square root), step for step; tests/test_optim.py checks it against
torch.optim.AdamW bit for bit. Pretraining, one long process, keeps torch.optim.
"""

from __future__ import annotations

from typing import Iterable

import torch


class AdamW:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # fmt: skip
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("AdamW got an empty parameter list")
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.state: dict[torch.nn.Parameter, list] = {}  # p -> [step, exp_avg, exp_avg_sq]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            if p not in self.state:
                self.state[p] = [0, torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format)]  # fmt: skip
            record = self.state[p]
            record[0] += 1
            step, exp_avg, exp_avg_sq = float(record[0]), record[1], record[2]
            grad = p.grad
            p.mul_(1 - self.lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)

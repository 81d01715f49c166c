"""Gradient descent on the CP factors reaches the optimum of a strongly convex problem.

The supplementary material's Theorem F.1: for a loss that is strongly convex in the adapted
weights, gradient descent with step <= 1/M drives L(W0 + dW) to L(W*). Checked numerically on
least-squares regression through adapted linear layers, whose optimum W* = W0 + T is reachable
because T is itself a CP tensor of rank below the adapter's.
"""

import torch
from peft import get_peft_model
from torch import nn

from peft_cp import AuroraConfig


class Parallel(nn.Module):
    """N independent linear maps of the same input: y_k = W_k x."""

    def __init__(self, num_matrices: int, width: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(num_matrices))

    def forward(self, x):
        return torch.stack([linear(x) for linear in self.maps])  # (N, batch, width)


def test_gradient_descent_on_the_factors_reaches_the_optimum():
    torch.manual_seed(0)
    num_matrices, width, true_rank = 4, 6, 2

    model = Parallel(num_matrices, width)
    w0 = torch.stack([linear.weight.detach().clone() for linear in model.maps])
    # T[k] = sum_r a_r b_r^T c_kr: a rank-2 CP tensor, reachable by a rank-4 adapter.
    a, b, c = torch.randn(width, true_rank), torch.randn(width, true_rank), torch.randn(4, 2)
    w_star = w0 + torch.einsum("ir,jr,kr->kij", a, b, c) / width

    x = torch.randn(256, width)  # full column rank: the loss is strongly convex in W
    y = torch.einsum("kij,nj->kni", w_star, x)

    peft_model = get_peft_model(
        model, AuroraConfig(rank=4, target_modules=r"maps\.\d+", init_weights=True)
    )
    factors = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(factors, lr=0.1)  # plain gradient descent, full batch

    def loss_fn():
        return 0.5 * (peft_model(x) - y).pow(2).sum() / len(x)

    initial = loss_fn().item()
    for _ in range(1500):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()

    final = loss_fn().item()
    assert initial > 1.0
    assert final < 1e-3 * initial  # L(W*) = 0

    store = peft_model.base_model.factor_store()
    learnt = torch.stack(
        [store.delta_weight(slice(k, k + 1), width, width) for k in range(num_matrices)]
    )
    torch.testing.assert_close(w0 + learnt.detach(), w_star, rtol=0, atol=2e-2)

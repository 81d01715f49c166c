import pytest
import torch

from peft_cp import AuroraFactorStore


def reference_delta(U, V, P, lam, k, scale=1.0):
    """dW_k from the CP tensor: dW[i, j, k] = scale * sum_r lam_r U[i, r] V[j, r] P[k, r]."""
    tensor = torch.einsum("r,ir,jr,kr->ijk", lam, U, V, P)
    return scale * tensor[:, :, k]


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_delta_weight_matches_the_cp_tensor(rank):
    torch.manual_seed(0)
    store = AuroraFactorStore(rank, num_rows=5, out_dims=[6], in_dims=[4], init_weights=False)
    with torch.no_grad():
        store.lam.uniform_(0.5, 2.0)

    delta = store.delta_weight(slice(1, 4), d_out=6, d_in=4, scale=0.5)

    expected = torch.cat(
        [reference_delta(store.U(6), store.V(4), store.P, store.lam, k, 0.5) for k in (1, 2, 3)]
    )
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_factors_are_keyed_by_dimension():
    store = AuroraFactorStore(4, num_rows=3, out_dims=[8, 6, 8], in_dims=[6, 10])

    shapes = {name: tuple(p.shape) for name, p in store.named_parameters()}

    assert shapes == {
        "U_6": (6, 4),
        "U_8": (8, 4),
        "V_6": (6, 4),
        "V_10": (10, 4),
        "P": (3, 4),
        "lam": (4,),
    }


def test_default_init_gives_zero_updates_but_random_factors():
    torch.manual_seed(0)
    store = AuroraFactorStore(16, num_rows=4, out_dims=[32], in_dims=[32])

    assert torch.count_nonzero(store.delta_weight(slice(0, 4), 32, 32)) == 0
    assert torch.count_nonzero(store.V(32)) == 0
    assert torch.all(store.lam == 1)
    assert store.U(32).std().item() == pytest.approx(1 / 4, rel=0.15)
    assert store.P.std().item() == pytest.approx(1.0, rel=0.3)


def test_init_weights_false_gives_nonzero_updates():
    torch.manual_seed(0)
    store = AuroraFactorStore(4, num_rows=2, out_dims=[8], in_dims=[8], init_weights=False)

    assert torch.count_nonzero(store.delta_weight(slice(0, 2), 8, 8)) == 16 * 8

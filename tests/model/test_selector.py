import pytest
import torch
import torch.nn.functional as F

from model.selector import PerturbedTopK, hard_topk_indicators, perturbed_topk_indicators


def reference_topk_indicators(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The obvious definition, for comparison: torch.topk then sort the indices."""
    idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return F.one_hot(idx, scores.shape[-1]).to(scores.dtype)


@pytest.mark.parametrize("T, k", [(8, 6), (32, 24), (24, 16), (5, 1), (6, 6)])
def test_hard_topk_matches_topk_and_keeps_temporal_order(T, k):
    torch.manual_seed(T * 100 + k)
    scores = torch.randn(16, T).softmax(-1)
    M = hard_topk_indicators(scores, k)
    assert torch.equal(M, reference_topk_indicators(scores, k))
    frames = (M * torch.arange(T)).sum(-1)
    assert (frames[:, 1:] > frames[:, :-1]).all(), "rows must be in ascending frame order"


def test_hard_topk_with_equal_scores_gives_a_valid_deterministic_choice():
    scores = torch.tensor([[0.25, 0.25, 0.25, 0.25],   # all tied
                           [0.1, 0.3, 0.3, 0.3],        # tie across the K boundary
                           [0.4, 0.1, 0.4, 0.1]])
    M = hard_topk_indicators(scores, 2)
    assert torch.equal(M.sum(-1), torch.ones(3, 2)), "each row selects exactly one frame"
    assert (M.sum(1) <= 1).all(), "no frame selected twice"
    frames = (M * torch.arange(4)).sum(-1)
    # Ties go to the earlier frame.
    assert frames.tolist() == [[0, 1], [1, 2], [0, 2]]
    assert torch.equal(M, hard_topk_indicators(scores.clone(), 2))


def test_hard_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= T"):
        hard_topk_indicators(torch.rand(2, 4), 5)


def test_perturbed_topk_approaches_hard_one_hot_as_sigma_vanishes():
    torch.manual_seed(0)
    scores = torch.randn(4, 12).softmax(-1)
    hard = hard_topk_indicators(scores, 5)
    errors = []
    for sigma in (0.3, 0.03, 1e-5):
        M = perturbed_topk_indicators(scores, 5, num_samples=2000, sigma=sigma)
        errors.append((M - hard).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] == 0.0


def test_perturbed_topk_rows_are_distributions_over_frames():
    torch.manual_seed(0)
    M = perturbed_topk_indicators(torch.randn(3, 10), 4, num_samples=300, sigma=0.5)
    assert torch.allclose(M.sum(-1), torch.ones(3, 4))


def test_full_jacobian_gradient_matches_finite_differences_of_the_smoothed_objective():
    """d/ds <G, E[Y(s + sigma z)]> by the estimator vs central differences with common random
    numbers. 400k samples each; measured error about 0.03 on gradients of about 2.4, so the
    tolerance 0.12 (5% of the largest component) leaves room for other seeds and platforms."""
    T, K, sigma, S, h = 5, 2, 0.5, 400_000, 0.05
    torch.manual_seed(0)
    scores = torch.tensor([[0.3, -0.2, 0.5, 0.1, 0.0]], requires_grad=True)
    G = torch.randn(1, K, T)

    torch.manual_seed(1)
    (perturbed_topk_indicators(scores, K, S, sigma, "full") * G).sum().backward()
    estimate = scores.grad[0]

    finite_diff = torch.zeros(T)
    for t in range(T):
        step = torch.zeros(1, T)
        step[0, t] = h
        torch.manual_seed(2)
        plus = PerturbedTopK.apply(scores.detach() + step, K, S, sigma, "full")
        torch.manual_seed(2)
        minus = PerturbedTopK.apply(scores.detach() - step, K, S, sigma, "full")
        finite_diff[t] = ((plus - minus) * G).sum() / (2 * h)

    assert (estimate - finite_diff).abs().max() < 0.05 * finite_diff.abs().max()

    # The authors' diagonal estimator drops the cross terms: it is a different vector.
    scores.grad = None
    torch.manual_seed(1)
    (perturbed_topk_indicators(scores, K, S, sigma, "diagonal") * G).sum().backward()
    assert (scores.grad[0] - finite_diff).abs().max() > 0.2 * finite_diff.abs().max()


def test_diagonal_estimator_is_the_diagonal_of_the_full_estimators_jacobian():
    """The authors' estimator keeps, of the full Jacobian dM[k, t] / ds[u], only the u = t terms:
    with the same noise, its gradient is sum_k G[k, t] J[k, t, t] exactly."""
    T, K, S, sigma = 6, 3, 200, 0.3
    scores = torch.tensor([[0.3, -0.2, 0.5, 0.1, 0.0, 0.25]], requires_grad=True)
    jacobian = torch.zeros(K, T, T)  # [k, t, u] = dM[k, t] / ds[u] by the full estimator
    for k in range(K):
        for t in range(T):
            scores.grad = None
            torch.manual_seed(7)  # the same noise samples for every backward pass
            perturbed_topk_indicators(scores, K, S, sigma, "full")[0, k, t].backward()
            jacobian[k, t] = scores.grad[0]
    G = torch.randn(1, K, T, generator=torch.Generator().manual_seed(3))

    def gradient(estimator: str) -> torch.Tensor:
        scores.grad = None
        torch.manual_seed(7)
        (perturbed_topk_indicators(scores, K, S, sigma, estimator) * G).sum().backward()
        return scores.grad[0].clone()

    diagonal = jacobian.diagonal(dim1=1, dim2=2)  # [k, t] = J[k, t, t]
    torch.testing.assert_close(gradient("diagonal"), (G[0] * diagonal).sum(0))
    torch.testing.assert_close(gradient("full"), torch.einsum("kt,ktu->u", G[0], jacobian))
    assert not torch.allclose(gradient("diagonal"), gradient("full"), atol=1e-3)


def test_perturbed_topk_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        perturbed_topk_indicators(torch.rand(1, 4), 2, estimator="exact")

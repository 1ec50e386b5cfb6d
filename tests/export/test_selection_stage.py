"""The first stage's step two (`selection_stage`): its numpy selectors choose the frames the
model's own selectors choose, and a video's score is exact when the query's first choice is
stored, the best stored choice otherwise."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.selector import FrameScorer, hard_topk_indicators
from twbert_export.retrieval import selection_stage as ss


def test_gelu_matches_torchs_erf_gelu():
    x = np.linspace(-8, 8, 20001, dtype=np.float32)
    expected = F.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ss.gelu(x), expected, rtol=1e-6, atol=2e-6)  # erf to 1.5e-7


def test_kept_mask_keeps_the_frames_hard_top_k_keeps_ties_included():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((64, 8)).astype(np.float32)
    scores[:16, 3] = scores[:16, 5]  # ties: the earlier frame wins in both
    scores[16:20] = 0.5  # all equal
    for k in (1, 4, 6, 8):
        kept = hard_topk_indicators(torch.from_numpy(scores), k).sum(1).numpy() > 0
        assert (ss.kept_mask(scores, k) == kept).all(), k


def test_the_split_scorer_chooses_as_the_models_frame_scorer():
    """The scorer's fuse Linear on [f_t, c] split into a frame half (applied at index time)
    and a text half (at query time) chooses the same frames as `FrameScorer` itself."""
    torch.manual_seed(0)
    D, T, B, k = 16, 8, 32, 6
    scorer = FrameScorer(D).eval()
    frames, text = torch.randn(B, T, D), torch.randn(B, D)
    with torch.no_grad():
        expected = hard_topk_indicators(scorer(frames, text), k).sum(1).numpy() > 0
        f = F.gelu(F.linear(F.layer_norm(frames, (D,), scorer.norm.weight, scorer.norm.bias,
                                         scorer.norm.eps), scorer.frame_proj.weight))
    fuse = scorer.fuse_proj.weight.detach().numpy().T  # (2D, D), as the graph's MatMul holds it
    out = scorer.score_out.weight.detach().numpy()[0]
    first = f.numpy() @ fuse[:D]
    scores = ss.gelu(first + (text.numpy() @ fuse[D:])[:, None, :]) @ out
    assert (ss.kept_mask(scores, k) == expected).all()


def query_side(D=8, K1=3, K2=2, seed=0):
    rng = np.random.default_rng(seed)
    return ss.QuerySide((rng.standard_normal((D, D)).astype(np.float32),
                         rng.standard_normal((D, D)).astype(np.float32)),
                        (rng.standard_normal(D).astype(np.float32),
                         rng.standard_normal(D).astype(np.float32)), (K1, K2))


def test_a_stored_first_choice_scores_exactly_another_gets_the_best_stored_choice():
    side, rng = query_side(), np.random.default_rng(1)
    T, D, E, (K1, K2) = 5, 8, 4, side.keep
    c = rng.standard_normal((1, D)).astype(np.float32)
    t = rng.standard_normal(E).astype(np.float32)
    t /= np.linalg.norm(t)
    first = rng.standard_normal((T, D)).astype(np.float32)
    query_kept = np.nonzero(ss.kept_mask(ss.gelu(first + c[0] @ side.text_fuse[0])
                                         @ side.score_out[0], K1))[0]
    others = [np.array(sorted(set(range(T)) - {int(query_kept[0])})[:K1]),
              np.array(sorted(set(range(T)) - {int(query_kept[-1])})[:K1])]
    second = rng.standard_normal((3, K1, D)).astype(np.float32)
    vision = rng.standard_normal((3, K1, E)).astype(np.float32)

    def cosine(u):
        keep = ss.kept_mask(ss.gelu(second[u] + c[0] @ side.text_fuse[1]) @ side.score_out[1], K2)
        v = vision[u][keep].mean(0)
        return float(v @ t / np.linalg.norm(v))

    stored = ss.VideoSelections(first, np.stack([others[0], query_kept]), second[:2], vision[:2])
    missed = ss.VideoSelections(first, np.stack([others[0], others[1]]),
                                second[[0, 2]], vision[[0, 2]])
    scores, exact = ss.scores(side, c, t, [stored, missed])
    assert exact.tolist() == [True, False]
    assert scores[0] == pytest.approx(cosine(1), abs=1e-5)
    assert scores[1] == pytest.approx(max(cosine(0), cosine(2)), abs=1e-5)


def test_a_selections_file_of_other_slots_or_another_video_or_damaged_is_not_read(tmp_path):
    v = ss.VideoSelections(np.zeros((5, 8), np.float32), np.array([[0, 1, 2]]),
                           np.zeros((1, 3, 8), np.float32), np.ones((1, 3, 4), np.float32))
    sha = "ab" * 32
    path = tmp_path / v.save(tmp_path, sha, "slots A")
    assert ss.VideoSelections.load(tmp_path, sha, "slots A") is not None
    assert ss.VideoSelections.load(tmp_path, sha, "slots B") is None
    path.rename(tmp_path / ss.DIRECTORY / f"{'cd' * 32}{ss.SUFFIX}")
    assert ss.VideoSelections.load(tmp_path, "cd" * 32, "slots A") is None  # names another video
    (tmp_path / ss.DIRECTORY / f"{sha}{ss.SUFFIX}").write_bytes(b"damaged")
    assert ss.VideoSelections.load(tmp_path, sha, "slots A") is None

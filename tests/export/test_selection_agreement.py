"""Frame selection agreement on hand-made indices and scores: identical, near-tie, divergent."""

import numpy as np

from twbert_export.validation.parity import selection_agreement

# One sample, 8 frames; the reference keeps the 6 best. Frames 5 and 6 tie at the boundary.
SCORES_1 = np.array([[0.20, 0.18, 0.16, 0.14, 0.12, 0.10, 0.10 - 1e-6, 0.00]])
REF_1 = np.array([[0, 1, 2, 3, 4, 5]])


def test_identical_near_tie_and_divergent_first_stage():
    same = selection_agreement(REF_1, REF_1, SCORES_1, score_tol=1e-4)
    assert (same["identical"], same["near_tie"], same["divergent"]) == (1, 0, 0)
    tie = selection_agreement(np.array([[0, 1, 2, 3, 4, 6]]), REF_1, SCORES_1, score_tol=1e-4)
    assert (tie["near_tie"], tie["near_tie_samples"], tie["divergent"]) == (1, [0], 0)
    far = selection_agreement(np.array([[1, 2, 3, 4, 5, 7]]), REF_1, SCORES_1, score_tol=1e-4)
    assert far["divergent"] == 1 and far["divergent_examples"][0]["test"] == [1, 2, 3, 4, 5, 7]


def test_second_stage_difference_after_a_first_stage_near_tie_is_a_near_tie():
    """After the tie, the test's stage 2 chose among other candidates (frame 6 has no reference
    stage-2 score): that follows from the stage-1 near-tie, it is not a divergence of its own."""
    scores_2 = np.array([[0.3, 0.25, 0.2, 0.15, 0.06, 0.04]])  # over REF_1's frames
    ref_2, test_2 = np.array([[0, 1, 2, 3]]), np.array([[0, 1, 2, 6]])
    alone = selection_agreement(test_2, ref_2, scores_2, 1e-4, candidates=REF_1)
    assert alone["divergent"] == 1
    after_tie = selection_agreement(test_2, ref_2, scores_2, 1e-4, candidates=REF_1,
                                    upstream_near_ties=[0])
    assert (after_tie["near_tie"], after_tie["divergent"]) == (1, 0)

import math

import pytest
import numpy as np

from twbert_export.validation.metrics import ranking_differences, ranks, recall_metrics, rerank


def test_ranks_on_a_hand_made_matrix():
    scores = np.array([[0.9, 0.1, 0.5],    # right answer first
                           [0.9, 0.1, 0.5],    # right answer (col 1) last
                           [0.2, 0.7, 0.7]])   # tie with a wrong one: counted against
    relevant = np.eye(3, dtype=bool)
    assert ranks(scores, relevant).tolist() == [1, 3, 2]
    m = recall_metrics(scores, relevant)
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@5"] == 1.0 and m["MedR"] == 2.0
    assert m["MeanR"] == pytest.approx(2.0)


def test_several_relevant_candidates_use_the_best_one():
    scores = np.array([[0.1, 0.8, 0.3, 0.9]])
    relevant = np.array([[True, True, False, False]])
    assert ranks(scores, relevant).tolist() == [2]


def test_query_without_relevant_candidate_is_an_error():
    with pytest.raises(ValueError, match="at least one relevant"):
        ranks(np.zeros((2, 3)), np.array([[True, False, False], [False] * 3]))


def test_rerank_orders_the_itc_shortlist_by_itm_and_keeps_the_rest_below():
    itc = np.array([[0.9, 0.8, 0.7, 0.1, 0.0]])
    itm = np.array([[0.1, 0.2, 0.95, 0.99, float("nan")]])  # col 3 is outside the top 3
    final = rerank(itc, itm, k=3)
    order = np.argsort(-final, axis=1, kind='stable')[0].tolist()
    assert order == [2, 1, 0, 3, 4]
    # With k = all, ITM alone decides.
    full = rerank(itc, np.nan_to_num(itm, nan=0.5), k=5)
    assert np.argsort(-full, axis=1)[0].tolist()[:2] == [3, 2]


def test_chance_level_of_random_scores_is_about_one_over_n():
    n = 200
    m = recall_metrics(np.random.default_rng(0).random((n, n)), np.eye(n, dtype=bool))
    assert m["R@1"] < 0.05 and math.isclose(m["MedR"], n / 2, rel_tol=0.25)


def test_ranking_differences_name_the_swapped_pairs_and_their_score_gaps():
    itc = {"a": 5.0, "b": 4.0, "c": 3.99, "d": 3.0, "e": 1.0}
    itm = {"a": 0.9, "b": 0.2, "c": 0.0, "d": 0.0, "e": 0.0}
    same = ranking_differences(list("abcde"), list("abcde"), itc, itm, k=2)
    assert same == {"equal": True, "same_shortlist": True, "swapped_pairs": 0,
                    "largest_gap": 0.0, "in_shortlist": 0}
    # c and d swap outside the shortlist (ITC 3.99 vs 3.0), a and b inside it (ITM 0.9 vs 0.2)
    diff = ranking_differences(list("abcde"), list("badce"), itc, itm, k=2)
    assert diff["swapped_pairs"] == 2 and diff["in_shortlist"] == 1
    assert diff["largest_gap"] == pytest.approx(0.99) and diff["same_shortlist"]
    assert not ranking_differences(list("abcde"), list("acbde"), itc, itm, k=2)["same_shortlist"]
    with pytest.raises(ValueError, match="different clips"):
        ranking_differences(list("abc"), list("abd"), itc, itm, k=2)

"""Revisitop mAP (leap.evaluation.retrieval) against hand-computed values and a direct
transcription of revisitop's compute_map / compute_ap on random rankings."""

import numpy as np
import pytest
import torch

from leap.evaluation import EvaluationError
from leap.evaluation.retrieval import GroundTruth, compute_map, rank_database, revisitop_scores, setting_lists

# ---------------------------------------------------------------- revisitop, transcribed
# From revisitop's python/evaluate.py (compute_ap, compute_map) and example_evaluate.py (the
# three settings). Only change: np.in1d -> np.isin (same semantics; in1d is gone from numpy 2).


def ref_compute_ap(ranks, nres):
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranks, gnd, kappas=()):
    map = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]["junk"])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = ref_compute_ap(pos, len(qgnd))
        map = map + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    map = map / (nq - nempty)
    pr = pr / (nq - nempty)
    return map, aps, pr, prs


def ref_settings(gnd):
    """example_evaluate.py: easy / medium / hard ground truth."""
    out = {}
    for name, ok, junk in (
        ("easy", ("easy",), ("junk", "hard")),
        ("medium", ("easy", "hard"), ("junk",)),
        ("hard", ("hard",), ("junk", "easy")),
    ):
        out[name] = [
            {
                "ok": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok]),
                "junk": np.concatenate([np.asarray(g[k], dtype=np.int64) for k in junk]),
            }
            for g in gnd
        ]
    return out


# ---------------------------------------------------------------- hand-computed


def _hand_case():
    # 6 database images, 2 queries; ranks[q] = database indices, best first.
    ranks = np.array([[3, 0, 5, 1, 4, 2], [2, 4, 0, 1, 3, 5]])
    gt = GroundTruth(
        imlist=[f"db{i}" for i in range(6)],
        qimlist=["q0", "q1"],
        gnd=[
            {"bbx": None, "easy": [0, 2], "hard": [1], "junk": [5]},
            {"bbx": None, "easy": [4], "hard": [], "junk": [2]},  # no hard positives: skipped in Hard
        ],
    )
    return ranks, gt


def test_map_hand_computed_easy_medium_hard():
    ranks, gt = _hand_case()
    s = revisitop_scores(ranks, gt)
    # Query 0, Easy: positives 0, 2 at ranks 1, 5; ignored 5 (junk), 1 (hard) at ranks 2, 3 -> 2 moves to 3.
    #   AP = [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = 1/3
    # Query 1: positive 4 at rank 1, junk 2 at rank 0 above it -> rank 0 -> AP = 1 (Easy and Medium).
    assert s["easy"]["aps"] == pytest.approx([1 / 3, 1.0], abs=1e-12)
    assert s["easy"]["mAP"] == pytest.approx((1 / 3 + 1) / 2, abs=1e-12)
    # Query 0, Medium: positives 0, 1, 2 at ranks 1, 3, 5; junk 5 at rank 2 -> ranks 1, 2, 4.
    #   AP = [(0 + 1/2)/2 + (1/2 + 2/3)/2 + (2/4 + 3/5)/2] / 3 = 83/180
    assert s["medium"]["aps"][0] == pytest.approx(83 / 180, abs=1e-12)
    assert s["medium"]["mAP"] == pytest.approx((83 / 180 + 1) / 2, abs=1e-12)
    # Query 0, Hard: positive 1 at rank 3; ignored 0 (easy), 5 (junk) above it -> rank 1 -> AP = 1/4.
    # Query 1 has no hard positive: left out of the mean, not counted as 0.
    assert s["hard"]["aps"][0] == pytest.approx(0.25, abs=1e-12)
    assert np.isnan(s["hard"]["aps"][1])
    assert s["hard"]["mAP"] == pytest.approx(0.25, abs=1e-12)
    assert (s["hard"]["skipped"], s["hard"]["queries"]) == (1, 1)
    assert (s["easy"]["skipped"], s["medium"]["skipped"]) == (0, 0)
    # Precision@k, query 0 Easy: positives at 1-based ranks 2, 4 -> P@1 = 0, P@5 -> k = min(4, 5) -> 2/4.
    assert s["easy"]["mP@1"] == pytest.approx((0 + 1) / 2)
    assert s["easy"]["mP@5"] == pytest.approx((0.5 + 1) / 2)


def test_map_hand_case_matches_transcription():
    ranks, gt = _hand_case()
    ours = revisitop_scores(ranks, gt)
    ref = ref_settings(gt.gnd)
    for setting in ("easy", "medium", "hard"):
        m, aps, pr, _ = ref_compute_map(ranks.T.copy(), ref[setting], [1, 5, 10])
        assert ours[setting]["mAP"] == pytest.approx(m, abs=1e-12)
        np.testing.assert_allclose(ours[setting]["aps"], aps, atol=1e-12)


def _random_gt(rng, nq, ndb, overlap=False):
    gnd = []
    for q in range(nq):
        perm = rng.permutation(ndb)
        n_e, n_h, n_j = rng.integers(0, 6, size=3)
        if q % 5 == 0:
            n_h = 0  # some queries without hard positives
        if q % 7 == 3:
            n_e = 0
        easy, hard, junk = perm[:n_e], perm[n_e : n_e + n_h], perm[n_e + n_h : n_e + n_h + n_j]
        if overlap and len(easy) and len(junk):
            junk = np.concatenate([junk, easy[:1]])  # an image both positive and junk
        gnd.append({"bbx": None, "easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    return GroundTruth([f"d{i}" for i in range(ndb)], [f"q{i}" for i in range(nq)], gnd)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_random_rankings_match_transcription(seed, overlap):
    rng = np.random.default_rng(seed)
    nq, ndb = 23, 61
    gt = _random_gt(rng, nq, ndb, overlap)
    ranks = np.stack([rng.permutation(ndb) for _ in range(nq)])
    ours = revisitop_scores(ranks, gt, kappas=(1, 5, 10))
    ref = ref_settings(gt.gnd)
    for setting in ("easy", "medium", "hard"):
        m, aps, pr, _ = ref_compute_map(ranks.T.copy(), ref[setting], [1, 5, 10])
        assert ours[setting]["mAP"] == pytest.approx(m, abs=1e-12)
        np.testing.assert_allclose(ours[setting]["aps"], aps, atol=1e-12)  # NaN where skipped, both
        assert [ours[setting][f"mP@{k}"] for k in (1, 5, 10)] == pytest.approx(pr.tolist(), abs=1e-12)
        assert ours[setting]["skipped"] == int(np.isnan(aps).sum())
    assert ours["hard"]["skipped"] > 0  # the no-positive path was exercised


def test_map_all_queries_without_positives_is_nan():
    gt = GroundTruth(["a", "b"], ["q"], [{"bbx": None, "easy": [0], "hard": [], "junk": []}])
    s = revisitop_scores(np.array([[1, 0]]), gt)
    assert np.isnan(s["hard"]["mAP"]) and s["hard"]["skipped"] == 1
    assert s["easy"]["mAP"] == pytest.approx(0.5 * (0.0 + 0.5))  # positive at rank 1: (0/1 + 1/2)/2


def test_setting_lists():
    _, gt = _hand_case()
    assert setting_lists(gt, "easy")[0] == ([0, 2], [5, 1])
    assert setting_lists(gt, "medium")[0] == ([0, 2, 1], [5])
    assert setting_lists(gt, "hard")[0] == ([1], [5, 0, 2])
    with pytest.raises(EvaluationError, match="setting"):
        setting_lists(gt, "extreme")


def test_compute_map_rejects_partial_rankings():
    with pytest.raises(EvaluationError, match="permutation"):
        compute_map(np.array([[0, 0, 1]]), [([0], [])])
    with pytest.raises(EvaluationError, match="indices"):
        compute_map(np.array([[0, 3, 1]]), [([0], [])])


def test_rank_database_is_cosine_order():
    q = torch.randn(5, 17, dtype=torch.float64)
    x = torch.randn(40, 17, dtype=torch.float64) * torch.rand(40, 1, dtype=torch.float64) * 10  # norms differ
    ranks = rank_database(q.half(), x.half())
    cos = (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T).numpy()
    ordered = np.take_along_axis(cos, ranks, axis=1)
    assert (np.diff(ordered, axis=1) <= 2e-3).all()  # non-increasing up to fp16 rounding
    assert (np.sort(ranks, axis=1) == np.arange(40)).all()
    with pytest.raises(EvaluationError, match="features"):
        rank_database(q[:, :3], x)

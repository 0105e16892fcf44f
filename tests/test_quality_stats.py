"""The quality suites' comparison statistics (benchmarks/quality/stats.py) against explicit
references: a loop-by-loop percentile bootstrap with the same seed, and hand-worked lr bands."""
import math

import numpy as np
import pytest

from benchmarks.quality import stats


def _reference_interval(diffs, level, n_boot, seed):
    """One resample per loop iteration, quantiles by sorting and interpolating by hand."""
    x = [float(v) for v in diffs]
    n = len(x)
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        means.append(sum(x[i] for i in idx) / n)
    means.sort()

    def quantile(q):
        pos = q * (n_boot - 1)
        i = int(math.floor(pos))
        frac = pos - i
        return means[i] if i + 1 >= n_boot else means[i] * (1 - frac) + means[i + 1] * frac

    return sum(x) / n, quantile((1 - level) / 2), quantile((1 + level) / 2)


@pytest.mark.parametrize("n_units,seed", [(5, 0), (12, 3), (20, 11)])
def test_paired_interval_matches_loop_reference(n_units, seed):
    rng = np.random.default_rng(100 + n_units)
    units = [(f"subject{i % 4}", i // 4) for i in range(n_units)]
    base = {u: float(v) for u, v in zip(units, rng.normal(0.6, 0.2, n_units))}
    cand = {u: base[u] + float(d) for u, d in zip(units, rng.normal(0.02, 0.05, n_units))}
    iv = stats.paired_interval(cand, base, n_boot=2000, seed=seed)
    ordered = sorted(units, key=str)
    mean, lo, hi = _reference_interval([cand[u] - base[u] for u in ordered], 0.95, 2000, seed)
    assert iv["n"] == n_units
    assert iv["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert iv["lo"] == pytest.approx(lo, rel=1e-12, abs=1e-15)
    assert iv["hi"] == pytest.approx(hi, rel=1e-12, abs=1e-15)
    assert iv["lo"] <= iv["mean"] <= iv["hi"]


def test_relative_differences_and_missing_units():
    base = {"a": 2.0, "b": 4.0, "c": 1.0, "d": None}
    cand = {"a": 2.2, "b": 3.0, "d": 5.0, "e": 1.0}
    assert stats.paired_differences(cand, base) == pytest.approx({"a": 0.2, "b": -1.0})
    assert stats.paired_differences(cand, base, relative=True) == pytest.approx({"a": 0.1, "b": -0.25})
    assert stats.paired_interval({"x": 1.0}, {"y": 1.0}) is None
    single = stats.paired_interval({"x": 2.0}, {"x": 1.0})
    assert single["lo"] == single["hi"] == 1.0 and not single["excludes_zero"]


def test_interval_excludes_zero_for_a_consistent_gain_and_includes_it_for_noise():
    rng = np.random.default_rng(7)
    base = {i: float(v) for i, v in enumerate(rng.normal(0.5, 0.3, 20))}
    # a gain of 0.05 on every unit, with a spread of raw scores (0.3) six times larger
    better = {i: base[i] + 0.05 + float(e) for i, e in enumerate(rng.normal(0.0, 0.01, 20))}
    iv = stats.paired_interval(better, base)
    assert iv["excludes_zero"] and iv["lo"] > 0.04 and iv["hi"] < 0.06
    # unpaired noise of the same size as the spread: the interval straddles zero
    noisy = {i: base[i] + float(e) for i, e in enumerate(rng.normal(0.0, 0.3, 20))}
    noisy_iv = stats.paired_interval(noisy, base)
    d = np.array([noisy[i] - base[i] for i in range(20)])
    assert abs(d.mean()) < 2 * d.std() / math.sqrt(20)  # the draw is noise, not a gap
    assert not noisy_iv["excludes_zero"] and noisy_iv["lo"] < 0 < noisy_iv["hi"]


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError):
        stats.bootstrap_mean_interval([])
    with pytest.raises(ValueError):
        stats.bootstrap_mean_interval([1.0, float("nan")])
    one = stats.bootstrap_mean_interval([0.3])
    assert one["lo"] == one["hi"] == one["mean"] == 0.3


def _reference_band(lrs, scores, higher, within=0.9):
    order = np.argsort(lrs)
    lrs = [lrs[i] for i in order]
    scores = [scores[i] for i in order]
    good = [s is not None for s in scores]
    cand = [i for i in range(len(lrs)) if good[i]]
    best = max(cand, key=lambda i: scores[i]) if higher else min(cand, key=lambda i: scores[i])
    ok = [good[i] and ((scores[i] >= within * scores[best]) if higher else (scores[best] / scores[i] >= within))
          for i in range(len(lrs))]
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(lrs) - 1 and ok[hi + 1]:
        hi += 1
    return lrs[best], lrs[lo], lrs[hi], math.log2(lrs[hi] / lrs[lo]), 0 < best < len(lrs) - 1


@pytest.mark.parametrize("seed", range(6))
def test_lr_band_matches_reference_on_random_sweeps(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 8))
    lrs = list(1e-4 * 2.0 ** np.arange(k))
    rng.shuffle(lrs)
    scores = [float(s) for s in rng.uniform(0.2, 1.0, k)]
    if seed % 3 == 0:
        scores[int(rng.integers(0, k))] = None  # a diverged run
    for higher in (True, False):
        band = stats.lr_band(lrs, scores, higher_is_better=higher)
        best, lo, hi, width, interior = _reference_band(lrs, scores, higher)
        assert (band["best_lr"], band["band_lo"], band["band_hi"], band["interior"]) == (best, lo, hi, interior)
        assert band["band_width_log2"] == pytest.approx(width)


def test_lr_band_worked_examples():
    lrs = [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]
    # accuracy: best 0.80 at 4e-4; 0.75 and 0.73 are within 90% (>= 0.72); 0.70 is not
    band = stats.lr_band(lrs, [0.70, 0.75, 0.80, 0.73, 0.50])
    assert band["best_lr"] == 4e-4 and band["interior"]
    assert (band["band_lo"], band["band_hi"]) == (2e-4, 8e-4) and band["band_width_log2"] == pytest.approx(2.0)
    # a loss whose best is at the top end: not interior; 0.1 / 0.105 >= 0.9 but 0.1 / 0.2 is not
    band = stats.lr_band(lrs, [0.4, 0.3, 0.2, 0.105, 0.1], higher_is_better=False)
    assert band["best_lr"] == 1.6e-3 and not band["interior"] and band["band_width_log2"] == pytest.approx(1.0)
    # an isolated good point beyond a diverged one does not widen the band
    band = stats.lr_band(lrs, [0.79, None, 0.80, 0.5, 0.5])
    assert band["band_width_log2"] == 0.0
    assert stats.lr_band(lrs, [None] * 5) is None
    with pytest.raises(ValueError):
        stats.lr_band(lrs, [0.1, -0.2, 0.3, 0.4, 0.5])


def test_interval_text():
    assert stats.interval_text(None) == "-"
    assert stats.interval_text({"mean": 0.0123, "lo": -0.004, "hi": 0.03}) == "+0.012 [-0.004, +0.030]"
    assert stats.interval_text({"mean": -0.021, "lo": -0.03, "hi": -0.012, "relative": True}) == "-2.1% [-3.0, -1.2]"


def test_e2e_metrics_worked_examples():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    from benchmarks.quality.e2e import text_scores

    refs = [["the cat sat down", "a dog"], ["there is a pub by the river", "a riverside pub"]]
    # each hypothesis equals one of its references: BLEU and ROUGE-L are perfect (multi-reference)
    perfect = text_scores(["a dog", "there is a pub by the river"], refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100.0)
    # ROUGE-L by hand: "the cat sat" vs "the cat sat down": LCS 3, precision 1, recall 3/4, F1 6/7;
    # "a pub" vs "a riverside pub": LCS 2, precision 1, recall 2/3, F1 4/5 (the better reference)
    partial = text_scores(["the cat sat", "a pub"], refs)
    assert partial["rouge_l"] == pytest.approx(100 * (6 / 7 + 4 / 5) / 2)
    assert 0.0 <= partial["bleu"] < 100.0


def test_e2e_data_deterministic_disjoint_and_every_slot_said():
    from benchmarks.quality.e2e_data import e2e_splits

    a = e2e_splits(300, 50, 80, n_refs=4, seed=3)
    assert a == e2e_splits(300, 50, 80, n_refs=4, seed=3) and a != e2e_splits(300, 50, 80, n_refs=4, seed=4)
    mrs = {split: {r["mr"] for r in rows} for split, rows in a.items()}
    assert [len(mrs[s]) for s in ("train", "val", "test")] == [300, 50, 80]
    assert not (mrs["train"] & mrs["test"]) and not (mrs["train"] & mrs["val"]) and not (mrs["val"] & mrs["test"])
    n_distinct = []
    for rows in a.values():
        for row in rows:
            rec = row["record"]
            n_distinct.append(len(set(row["refs"])))
            for ref in row["refs"]:
                text = ref.lower()
                assert rec["name"].lower() in text and rec["eatType"] in text, ref
                for slot in ("food", "customer rating", "near"):
                    if slot in rec:
                        assert rec[slot].lower() in text, (slot, ref)
                if "area" in rec:
                    assert ("riverside" if rec["area"] == "riverside" else "cent") in text, ref
    assert np.mean(n_distinct) > 3.5  # the references of a record differ


def test_paired_vs_baseline_pairs_by_seed():
    runs = {"adamw": [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}, {"seed": 2, "acc": 0.7}],
            "other": [{"seed": 2, "acc": 0.8}, {"seed": 0, "acc": 0.5}, {"seed": 1, "acc": None}]}
    out = stats.paired_vs_baseline(runs, "adamw", {"acc": False})
    assert set(out) == {"other"}
    iv = out["other"]["acc"]
    assert iv["n"] == 2 and iv["units"] == [0, 2] and iv["mean"] == pytest.approx(0.05)
    assert stats.paired_vs_baseline({"other": runs["other"]}, "adamw", {"acc": False}) == {}


def test_sweep_lr_extends_the_grid_until_the_best_is_interior():
    """`common.sweep_lr` on a score peaked at 2^-7 (worked by hand): a grid around 2^-3 grows one
    point at a time on the low side, each lr half the last, and stops once the peak is interior
    or the extensions run out; ties go to the lower lr; a fixed lr is never extended."""
    from benchmarks.quality import common as C

    assert C.log2_grid(3e-3, 3) == [1.5e-3, 3e-3, 6e-3] and C.log2_grid(1.0, 4) == [0.5, 1.0, 2.0, 4.0]
    calls = []

    def run(lr):
        calls.append(lr)
        return {"score": -abs(math.log2(lr) + 7)}

    def key(rec):
        return (rec["score"],)

    out = C.sweep_lr(run, C.log2_grid(2.0 ** -3, 3), key, max_extend=4)
    assert calls == [2.0 ** -4, 2.0 ** -3, 2.0 ** -2, 2.0 ** -5, 2.0 ** -6, 2.0 ** -7, 2.0 ** -8]
    assert out["lrs"] == sorted(calls) and out["best_lr"] == 2.0 ** -7 and out["interior"] is True
    assert out["extended"] == 4 and set(out["sweep"]) == set(calls)
    calls.clear()
    out = C.sweep_lr(run, C.log2_grid(2.0 ** -3, 3), key, max_extend=3)
    assert calls[-1] == 2.0 ** -7 and out["best_lr"] == 2.0 ** -7 and out["interior"] is False
    calls.clear()
    out = C.sweep_lr(run, [2.0 ** -10, 2.0 ** -9], key, max_extend=5)  # upwards
    assert calls == [2.0 ** -10, 2.0 ** -9, 2.0 ** -8, 2.0 ** -7, 2.0 ** -6] and out["interior"] is True
    out = C.sweep_lr(lambda lr: {"score": 1.0}, [1.0, 2.0, 4.0], key, max_extend=0)
    assert out["best_lr"] == 1.0 and out["interior"] is False  # a tie goes to the lower lr
    calls.clear()
    out = C.sweep_lr(run, [1.0], key, max_extend=3, fixed=True)
    assert calls == [1.0] and out["interior"] is None and out["extended"] == 0

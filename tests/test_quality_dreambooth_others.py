"""`python -m benchmarks.quality dreambooth-others`: the judge-tuned lr sweep (extended until the best
lr is interior), the rounds of runs it plans, the paired table against AdamW on explicit numbers, and
one smoke run end to end through real worker processes."""
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks.quality import common as C  # noqa: E402
from benchmarks.quality import dreambooth_others as O  # noqa: E402
from benchmarks.quality.__main__ import main  # noqa: E402

APP_LR = 2e-3
PROF = O.PROFILES["quick"]


def _run(config, lr, subject="heart", seed=0, fidelity=0.5, similarity=0.8, **metrics):
    return {"part": "a", "config": config, "lr": lr, "subject": subject, "seed": seed, "subject_fidelity": fidelity,
            "similarity": similarity, "subject_loss": metrics.get("subject_loss", 0.04),
            "prior_loss": metrics.get("prior_loss", 0.02), "prior": metrics.get("prior", 0.95)}


def test_grid_points():
    assert C.best_grid_point({1e-3: (0.5,), 2e-3: (0.7,), 4e-3: (0.7,)}) == 2e-3  # equal keys: the lower lr
    assert C.next_grid_point({1e-3: (0.9,), 2e-3: (0.7,)}) == 5e-4
    assert C.next_grid_point({1e-3: (0.1,), 2e-3: (0.7,)}) == 4e-3
    assert C.next_grid_point({1e-3: (0.1,), 2e-3: (0.7,), 4e-3: (0.2,)}) is None


def test_tuning_extends_until_interior():
    runs = [_run("scaled-adamw", lr, fidelity=f) for lr, f in ((1e-3, 0.2), (2e-3, 0.5), (4e-3, 0.6))]
    st = O.tuning(runs[:2], "scaled-adamw", APP_LR, PROF)
    assert st["grid"] == [1e-3, 2e-3, 4e-3] and not st["settled"] and st["lr"] is None  # 4e-3 not run yet
    st = O.tuning(runs, "scaled-adamw", APP_LR, PROF)
    assert st["best_lr"] == 4e-3 and st["interior"] is False and st["grid"] == [1e-3, 2e-3, 4e-3, 8e-3]
    assert not st["settled"]
    st = O.tuning(runs + [_run("scaled-adamw", 8e-3, fidelity=0.3)], "scaled-adamw", APP_LR, PROF)
    assert st["settled"] and st["interior"] and st["lr"] == st["best_lr"] == 4e-3
    # equal fidelity: the higher similarity wins; the grid stops growing at MAX_GRID_POINTS
    tied = [_run("adafactor", lr, fidelity=0.5, similarity=s) for lr, s in ((1e-3, 0.7), (2e-3, 0.9), (4e-3, 0.8))]
    assert O.tuning(tied, "adafactor", APP_LR, PROF)["lr"] == 2e-3
    rising = [_run("adafactor", APP_LR * 2.0 ** k, fidelity=0.1 * (k + 2)) for k in range(-1, O.MAX_GRID_POINTS - 1)]
    st = O.tuning(rising, "adafactor", APP_LR, PROF)
    assert st["settled"] and not st["interior"] and len(st["grid"]) == O.MAX_GRID_POINTS
    assert st["lr"] == APP_LR * 2.0 ** (O.MAX_GRID_POINTS - 2)
    # Prodigy: confirmed at its documented lr from the start, its grid never extended
    st = O.tuning([], "prodigy", APP_LR, PROF)
    assert st["grid"] == [0.5, 1.0, 2.0] and st["lr"] == 1.0
    st = O.tuning([_run("prodigy", lr, fidelity=f) for lr, f in ((0.5, 0.1), (1.0, 0.2), (2.0, 0.9))], "prodigy",
                  APP_LR, PROF)
    assert st["settled"] and st["best_lr"] == 2.0 and st["lr"] == 1.0 and st["grid"] == [0.5, 1.0, 2.0]


def test_plan_rounds():
    prof = dict(PROF, configs=("prodigy", "scaled-adamw"), baselines=("adamw",), confirm_subjects=("crescent", "arrow"),
                confirm_seeds=(0, 1))
    kept = [_run("adamw", APP_LR), _run("adamw", APP_LR, "crescent", 0)]  # the confirmation's runs
    jobs, _ = O.plan(kept, prof, APP_LR, workers=2)
    tune = [(j["config"], j["lr"]) for j in jobs if j["subject"] == "heart"]
    assert tune == [("adamw", 1e-3), ("adamw", 4e-3), ("prodigy", 0.5), ("prodigy", 1.0), ("prodigy", 2.0),
                    ("scaled-adamw", 1e-3), ("scaled-adamw", 2e-3), ("scaled-adamw", 4e-3)]
    assert len(jobs) == 8  # an even number of tuning runs: no confirmation run tops it up
    jobs, _ = O.plan(kept, prof, APP_LR, workers=3)
    assert [(j["config"], j["subject"]) for j in jobs[8:]] == [("prodigy", "crescent")]  # the fixed lr's first
    done = kept + [_run(c, lr, fidelity=f) for (c, lr), f in zip(
        tune, (0.4, 0.5, 0.3, 0.6, 0.5, 0.2, 0.7, 0.4))]
    jobs, states = O.plan(done, prof, APP_LR, workers=2)
    assert states["scaled-adamw"]["lr"] == 2e-3 and states["adamw"]["lr"] == 2e-3
    rows = {r["config"]: r for r in O.tuning_rows(states, prof, APP_LR)}
    assert rows["scaled-adamw"]["sweep"] == [[1e-3, 0.2], [2e-3, 0.7], [4e-3, 0.4]]
    assert rows["scaled-adamw"]["band"]["band_width_log2"] == 0.0  # 0.2 and 0.4 < 90% of 0.7
    assert (rows["prodigy"]["best_lr"], rows["prodigy"]["confirmed_at"]) == (1.0, 1.0)
    assert rows["adamw"]["confirmed_at"] == APP_LR and rows["adamw"]["band"]["band_lo"] == 2e-3
    assert [(j["seed"], j["subject"], j["config"], j["lr"]) for j in jobs] == [
        (0, "crescent", "prodigy", 1.0), (0, "crescent", "scaled-adamw", 2e-3),
        (0, "arrow", "adamw", APP_LR), (0, "arrow", "prodigy", 1.0), (0, "arrow", "scaled-adamw", 2e-3),
        (1, "crescent", "adamw", APP_LR), (1, "crescent", "prodigy", 1.0), (1, "crescent", "scaled-adamw", 2e-3),
        (1, "arrow", "adamw", APP_LR), (1, "arrow", "prodigy", 1.0), (1, "arrow", "scaled-adamw", 2e-3)]
    assert O.plan(done + [{**j, **_run(j["config"], j["lr"], j["subject"], j["seed"])} for j in jobs], prof, APP_LR,
                  2)[0] == []


def test_pairs_table_on_explicit_numbers():
    prof = dict(PROF, configs=("scaled-adamw",), baselines=("adamw",), confirm_subjects=("crescent", "arrow"),
                confirm_seeds=(0, 1))
    fid = {("crescent", 0): (0.8, 0.7), ("crescent", 1): (0.9, 0.9), ("arrow", 0): (0.6, 0.8), ("arrow", 1): (0.7, 0.5)}
    runs = [_run("adamw", APP_LR, s, d, fidelity=a, subject_loss=0.05) for (s, d), (a, _) in fid.items()]
    runs += [_run("scaled-adamw", 4e-3, s, d, fidelity=b, subject_loss=0.055) for (s, d), (_, b) in fid.items()
             if (s, d) != ("arrow", 1)]
    runs += [_run("scaled-adamw", 2e-3, "arrow", 1, fidelity=0.0)]  # another lr: not the tuned one, left out
    states = {"scaled-adamw": {"lr": 4e-3}}
    table = {r["config"]: r for r in O.pairs_table(runs, prof, states, APP_LR)}
    assert table["adamw"]["pairs"] == 4 and math.isclose(table["adamw"]["subject_fidelity"], 0.75)
    row = table["scaled-adamw"]
    assert row["pairs"] == 3 and math.isclose(row["subject_fidelity"], (0.7 + 0.9 + 0.8) / 3)
    iv = row["subject_fidelity_vs_adamw"]
    assert math.isclose(iv["mean"], ((0.7 - 0.8) + 0.0 + (0.8 - 0.6)) / 3) and iv["n"] == 3
    assert (row["subject_fidelity_higher"], row["subject_fidelity_lower"]) == (1, 1)
    assert math.isclose(row["subject_loss_vs_adamw"]["mean"], 0.1) and row["subject_loss_higher"] == 3  # +10%
    shown = O.confirmation_table({"confirmation": list(table.values())})
    assert shown[0][:5] == ["adamw", "0.002", 4, "0.750", "-"] and len(shown[1]) == len(O.CONFIRM_HEADERS)
    assert shown[1][4].startswith("+0.033 [") and shown[1][4].endswith("(1 / 1)") and shown[1][6].startswith("+10.0% [")


def test_load_runs_and_bad_input(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": [_run("adamw", APP_LR, fidelity=0.1), {**_run("adamw", APP_LR), "part": "b"}]}))
    b.write_text(json.dumps({"runs": [_run("adamw", APP_LR, fidelity=0.9), _run("adamw", APP_LR, "unknown")]}))
    runs = O._load_runs([str(a), str(b), str(tmp_path / "missing.json")], PROF)
    assert [(r["part"], r["subject_fidelity"]) for r in runs] == [("a", 0.1)]  # first file first, part (a) only
    threads = torch.get_num_threads()
    try:  # bad input: one error line, exit 2, nothing run
        assert main(["dreambooth-others", "--configs", "adamw,nosuch"]) == 2
        assert main(["dreambooth-others", "--workers", "0"]) == 2
        assert main(["dreambooth-others", "--full"]) == 2
        assert main(["dreambooth-others", "--report", "--out-dir", str(tmp_path / "none")]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err) and "'nosuch'" in err[0]


@pytest.mark.slow
def test_dreambooth_others_smoke(tmp_path, capsys):
    """One round through two real worker processes: AdamW's runs are kept from the confirmation's file
    (here a stand-in), Prodigy's lr is fixed, so its tuning run and its confirmation run go out
    together; every run judged and scored; `--report` prints the JSON's tables; `--resume` with
    nothing missing runs nothing and keeps the file's parts."""
    kept = [{**_run("adamw", APP_LR, subject, fidelity=0.0, subject_loss=loss), "seconds": 1.0, "n_images": 7}
            for subject, loss in (("heart", 0.079), ("crescent", 0.104))]
    (tmp_path / "quality_dreambooth_quick_smoke.json").write_text(json.dumps({"runs": kept}))
    threads = torch.get_num_threads()
    argv = ["dreambooth-others", "--smoke", "--out-dir", str(tmp_path)]
    try:
        assert main(argv) == 0
        with open(tmp_path / "quality_dreambooth_others_smoke.json") as fh:
            out = json.load(fh)
        capsys.readouterr()
        assert main(argv + ["--report"]) == 0
        printed = capsys.readouterr().out
        assert main(argv + ["--resume"]) == 0
        with open(tmp_path / "quality_dreambooth_others_smoke.json") as fh:
            again = json.load(fh)
    finally:
        torch.set_num_threads(threads)
    assert out["missing_runs"] == 0 and not out["failed_workers"] and out["commit"]
    assert out["runs"][:2] == kept and sorted((r["config"], r["subject"], r["worker"]) for r in out["runs"][2:]) == [
        ("prodigy", "crescent", "w1"), ("prodigy", "heart", "w0")]
    for r in out["runs"][2:]:
        assert r["lr"] == 1.0 and 0.0 <= r["subject_fidelity"] <= 1.0 and r["n_images"] == 7
        assert math.isfinite(r["subject_loss"]) and math.isfinite(r["prior_loss"]) and 0.0 <= r["prior"] <= 1.0
    assert [(t["config"], t["confirmed_at"]) for t in out["tuning"]] == [("adamw", APP_LR), ("prodigy", 1.0)]
    row = out["confirmation"][1]
    assert row["config"] == "prodigy" and row["pairs"] == 1 and row["subject_loss_vs_adamw"]["n"] == 1
    assert "confirmation on crescent" in printed and "prodigy" in printed
    assert out["own_runs"] == 2 and out["own_run_s_sum"] > 0 and [p["rounds"] for p in out["parts"]] == [1]
    assert again["runs"] == out["runs"] and [p["rounds"] for p in again["parts"]] == [1, 0]
    assert again["confirmation"] == out["confirmation"]

"""kohya dataset configs (`--dataset_config`), several concepts with repeats and regularisation
subsets, and caption shuffling (`--shuffle_caption --keep_tokens`).

The TOMLs of kohya-ss/sd-scripts' docs/config_README-en.md live in tests/fixtures/kohya_dataset_configs
with only their folder paths changed (`{root}`): each parses, or fails with one line naming the
unsupported key and the file. Parsing, inheritance, errors, repeats and caption processing run
in-process; one `accelerate launch` run trains the DreamBooth part of the overview example (two
concepts and a regularisation subset) and checks the files' dataset metadata.
"""
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from adaprelora.training.dreambooth.captions import CaptionOptions, process_caption
from adaprelora.training.dreambooth.config import TrainConfig
from adaprelora.training.dreambooth.dataset_config import load_dataset_config
from adaprelora.training.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tests" / "fixtures" / "kohya_dataset_configs"
FINE_TUNING_PART = "# This is a fine-tuning dataset"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, write_images) -> Path:
    """The example configs' folders: hoge (2 images, one captioned with tags), fuga (3), reg (4),
    piyo (1), image_dir (2, with the README's caption examples)."""
    root = tmp_path_factory.mktemp("kohya")
    write_images(root / "hoge", [(64, 128), (80, 80)], seed=1)
    write_images(root / "fuga", [(128, 64), (64, 64), (96, 96)], seed=2)
    write_images(root / "reg", [(64, 64)] * 4, seed=3)
    write_images(root / "piyo", [(64, 64)], seed=4)
    write_images(root / "image_dir", [(64, 64), (64, 96)], seed=5)
    (root / "hoge" / "img0.txt").write_text("hoge girl, red hair, smile, outdoors, blue sky")
    (root / "image_dir" / "img0.txt").write_text(
        "1girl, hatsune miku, vocaloid, upper body, looking at viewer, sky;;;cloud;;;day, outdoors")
    (root / "image_dir" / "img1.txt").write_text("stage, microphone, {simple|white} background, {{retro style}}")
    return root


def example(name: str, root: Path, text_filter=lambda text: text) -> str:
    """The sd-scripts example `name` with its folders under `root`, written next to them."""
    text = text_filter((EXAMPLES / name).read_text(encoding="utf-8")).replace("{root}", str(root))
    path = root / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_toml(root: Path, name: str, text: str) -> str:
    path = root / name
    path.write_text(text.replace("{root}", str(root)), encoding="utf-8")
    return str(path)


# -- the sd-scripts examples ----------------------------------------------------------------------
@pytest.mark.parametrize("name, key", [
    ("overview.toml", "datasets[1].subsets[0].metadata_file"),  # its second dataset is a fine-tuning one
    ("duplicate_subsets.toml", "datasets[1].resolution"),  # one resolution per run here
    ("skip_image_resolution.toml", "datasets[1].skip_image_resolution"),
])
def test_sd_scripts_examples_with_unsupported_keys_fail_naming_key_and_file(folders, name, key):
    path = example(name, folders)
    with pytest.raises(UserError) as info:
        load_dataset_config(path)
    message = str(info.value)
    assert message.startswith(f"--dataset_config {path}: {key}") and "\n" not in message


def test_sd_scripts_examples_parse_with_kohya_inheritance(folders):
    """The overview's DreamBooth dataset: [general] < [[datasets]] < [[datasets.subsets]] < flags."""
    path = example("overview.toml", folders, lambda text: text.split(FINE_TUNING_PART)[0])
    cfg = TrainConfig(resolution=64, train_batch_size=1, caption_separator=";", random_flip=True)
    parsed = load_dataset_config(path, cfg)
    assert (parsed.settings.resolution, parsed.settings.batch_size) == (512, 4)  # the file wins over the flags
    assert parsed.settings.enable_bucket is False  # not in the file: the flag's value
    hoge, fuga, reg = parsed.subsets
    assert [s.caption.keep_tokens for s in parsed.subsets] == [2, 3, 1]  # dataset's, own, own
    assert all(s.caption.shuffle_caption for s in parsed.subsets)  # from [general]
    assert all(s.caption_extension == ".txt" and s.num_repeats == 1 for s in parsed.subsets)
    assert all(s.caption.caption_separator == ";" and s.flip_aug for s in parsed.subsets)  # from the flags
    assert (hoge.class_tokens, fuga.class_tokens, reg.class_tokens) == ("hoge girl", "fuga boy", "human")
    assert [s.is_reg for s in parsed.subsets] == [False, False, True]
    assert parsed.instance_subsets == (hoge, fuga) and parsed.reg_subsets == (reg,)

    wildcard = load_dataset_config(example("secondary_separator.toml", folders))
    s = wildcard.settings
    assert (s.resolution, s.batch_size, s.enable_bucket, s.bucket_no_upscale) == (1024, 6, True, True)
    (subset,) = wildcard.subsets
    assert subset.flip_aug and subset.num_repeats == 1
    assert subset.caption == CaptionOptions(
        shuffle_caption=True, keep_tokens_separator="|||", secondary_separator=";;;",
        caption_prefix="1girl, hatsune miku, vocaloid |||",
        caption_suffix=", anime screencap ||| masterpiece, rating: general", caption_tag_dropout_rate=0.1,
        enable_wildcard=True)


def test_config_validate_applies_the_file_and_refuses_replaced_flags(folders, tmp_path):
    path = example("overview.toml", folders, lambda text: text.split(FINE_TUNING_PART)[0])
    cfg = TrainConfig(pretrained_model_name_or_path="m", dataset_config=path, output_dir=str(tmp_path / "out"),
                      report_to="none", resolution=64)
    cfg.validate()
    assert (cfg.resolution, cfg.train_batch_size, cfg.with_prior_preservation) == (512, 4, True)
    assert not (tmp_path / "out").exists()
    both = TrainConfig(pretrained_model_name_or_path="m", dataset_config=path, instance_data_dir=str(folders / "hoge"),
                       instance_prompt="a photo", output_dir=str(tmp_path / "out"), report_to="none")
    with pytest.raises(UserError, match="--dataset_config and --instance_data_dir and --instance_prompt both"):
        both.validate()
    cached = TrainConfig(pretrained_model_name_or_path="m", dataset_config=example("secondary_separator.toml", folders),
                         output_dir=str(tmp_path / "out"), report_to="none", cache_latents=True)
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]\.flip_aug is true, but --cache_latents"):
        cached.validate()


# -- bad input --------------------------------------------------------------------------------------
BAD = {
    "missing folder": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/nowhere'\n",
                       "datasets[0].subsets[0].image_dir: folder"),
    "zero images": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/empty'\n",
                    "datasets[0].subsets[0].image_dir: no PNG, JPEG or WebP image"),
    "negative repeats": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/hoge'\nnum_repeats = -2\n",
                         "datasets[0].subsets[0].num_repeats must be at least 1, got -2"),
    "unknown key": ("[general]\nshufle_caption = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/hoge'\n",
                    "general.shufle_caption: unknown key"),
    "invalid TOML": ("[[datasets]]\nresolution = \n", "invalid TOML"),
    "wrong type": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/hoge'\nkeep_tokens = 'two'\n",
                   "datasets[0].subsets[0].keep_tokens must be int"),
    "subset key in general": ("[general]\nimage_dir = '{root}/hoge'\n", "general.image_dir: image_dir belongs in"),
    "only reg": ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/reg'\nis_reg = true\n",
                 "every subset has is_reg = true"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dataset_configs_are_one_line_naming_key_and_file(folders, case):
    (folders / "empty").mkdir(exist_ok=True)
    text, expected = BAD[case]
    path = write_toml(folders, f"bad-{case.replace(' ', '-')}.toml", text)
    with pytest.raises(UserError) as info:
        load_dataset_config(path)
    message = str(info.value)
    assert message.startswith(f"--dataset_config {path}: ") and expected in message and "\n" not in message


@pytest.mark.slow
def test_bad_dataset_config_through_the_cli_exits_2_writing_nothing(folders, tmp_path):
    """`python train_dreambooth.py --dataset_config BAD.toml`: one `error:` line, exit 2, no output folder
    (the file is checked before any model is looked for)."""
    path = write_toml(folders, "bad-cli.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/hoge'\n"
                                               "num_repeats = -1\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(tmp_path / "m"),
           "--dataset_config", path, "--output_dir", str(out), "--report_to", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: --dataset_config {path}: datasets[0].subsets[0].num_repeats must be at least 1, got -1"]
    assert not out.exists()


def test_images_without_caption_nor_class_tokens_are_one_error(folders, tmp_path):
    from adaprelora.training.dreambooth.data import check_instance_data

    no_tokens = write_toml(folders, "bad-tokens.toml", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root}/fuga'\n")
    cfg = TrainConfig(pretrained_model_name_or_path="m", dataset_config=no_tokens, output_dir=str(tmp_path / "o"),
                      report_to="none")
    cfg.validate()
    with pytest.raises(UserError, match=r"datasets\[0\]\.subsets\[0\]\.class_tokens is missing and 3 image"):
        check_instance_data(cfg)


# -- repeats and the epoch --------------------------------------------------------------------------
def test_repeats_are_counted_in_the_epoch_and_reg_items_match_them(folders, tmp_path):
    from adaprelora.training.dreambooth.data import build_dataloader, check_instance_data, check_reg_data
    from adaprelora.training.dreambooth.kohya_metadata import dataset_metadata

    path = write_toml(folders, "repeats.toml", """
[general]
resolution = 32
batch_size = 2
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  [[datasets.subsets]]
  image_dir = '{root}/reg'
  class_tokens = 'girl'
  is_reg = true
  num_repeats = 4
""")
    cfg = TrainConfig(pretrained_model_name_or_path="m", dataset_config=path, output_dir=str(tmp_path / "o"),
                      report_to="none", seed=0).validate()
    instance, _ = check_instance_data(cfg)
    reg, _ = check_reg_data(cfg)
    dataset, loader, _ = build_dataloader(cfg, instance, reg)
    n_items = 2 * 3 + 3 * 1
    assert len(dataset) == n_items and len(loader) == (n_items + 1) // 2  # batch_size 2 from the file
    seen = Counter(Path(dataset[i]["instance_prompt"] and dataset.instance_records[i].path).parent.name
                   for i in range(len(dataset)))
    assert seen == {"hoge": 6, "fuga": 3}
    per_image = Counter(r.path for r in dataset.instance_records)
    assert {Path(p).parent.name: n for p, n in per_image.items()} == {"hoge": 3, "fuga": 1}
    # 4 reg images x 4 repeats = 16 reg items, cut to the 9 training items (kohya's epoch: as many of each).
    assert len(dataset.class_records) == n_items
    assert [dataset[i]["class_prompt"] for i in range(n_items)] == ["girl"] * n_items
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)  # 2 instance + 2 class images
    meta = dataset_metadata(instance, None, reg, None)
    assert json.loads(meta["ss_dataset_dirs"]) == {"hoge": {"n_repeats": 3, "img_count": 2},
                                                   "fuga": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 4, "img_count": 4}}
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("9", "16")
    assert json.loads(meta["ss_tag_frequency"])["hoge"] == {
        "hoge girl": 2, "red hair": 1, "smile": 1, "outdoors": 1, "blue sky": 1}


# -- caption shuffling -------------------------------------------------------------------------------
def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    tags = [f"tag{i}" for i in range(8)]
    caption = ", ".join(tags)
    options = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    outs = [process_caption(caption, options, random.Random(seed)).split(", ") for seed in range(20)]
    assert all(out[:2] == tags[:2] and sorted(out[2:]) == sorted(tags[2:]) for out in outs)
    assert len({tuple(out) for out in outs}) > 10  # really shuffled
    assert process_caption(caption, options, random.Random(5)) == process_caption(caption, options, random.Random(5))
    # Own separator; without shuffling the caption is unchanged; tag dropout spares the kept tokens.
    assert sorted(process_caption("a;b;c", CaptionOptions(True, 0, ";"), random.Random(1)).split(", ")) == ["a", "b", "c"]
    assert process_caption(caption, CaptionOptions(keep_tokens=2), random.Random(0)) == caption
    dropped = process_caption(caption, CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=1.0), random.Random(0))
    assert dropped == "tag0"


def test_keep_tokens_separator_secondary_separator_and_wildcards_as_in_the_readme():
    """The behaviour sd-scripts' README gives for its caption examples."""
    keep = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    caption = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt, smile ||| best quality, rating: general"
    for seed in range(10):
        out = process_caption(caption, keep, random.Random(seed)).split(", ")
        assert out[:3] == ["1girl", "hatsune miku", "vocaloid"] and out[-2:] == ["best quality", "rating: general"]
        assert sorted(out[3:-2]) == sorted(["stage", "microphone", "white shirt", "smile"])
    second = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    out = process_caption("1girl, upper body, sky;;;cloud;;;day, outdoors", second, random.Random(3)).split(", ")
    assert "sky,cloud,day" in out and len(out) == 4
    wild = CaptionOptions(enable_wildcard=True)
    outs = {process_caption("1girl, {simple|white} background, {{retro style}}", wild, random.Random(s))
            for s in range(20)}
    assert outs == {"1girl, simple background, {retro style}", "1girl, white background, {retro style}"}
    lines = {process_caption("line one\nline two", wild, random.Random(s)) for s in range(20)}
    assert lines == {"line one", "line two"}
    assert process_caption("line one\nline two", CaptionOptions(), random.Random(0)) == "line one"
    prefixed = CaptionOptions(caption_prefix="pre,", caption_suffix=", post")
    assert process_caption("mid", prefixed, random.Random(0)) == "pre, mid , post"


def test_shuffle_flags_are_seeded_by_seed_epoch_and_item(instance_dir, tmp_path):
    """`--shuffle_caption --keep_tokens` without a dataset config: the same (seed, epoch, item) gives the
    same prompt (a resumed run sees what an uninterrupted one does), another epoch another order."""
    from adaprelora.training.dreambooth.data import build_dataloader, scan_instance_images

    records, _ = scan_instance_images(instance_dir)
    prompt = "sks toy, red, small, wooden, on a table, studio light"

    def prompts(epoch: int) -> list[str]:
        cfg = TrainConfig(pretrained_model_name_or_path="m", instance_data_dir=instance_dir, instance_prompt=prompt,
                          output_dir=str(tmp_path / "o"), report_to="none", seed=7, resolution=32,
                          shuffle_caption=True, keep_tokens=1).validate()
        dataset, _, _ = build_dataloader(cfg, records, [])
        dataset.set_epoch(epoch)
        return [dataset[i]["instance_prompt"] for i in range(len(dataset))]

    first, again, later = prompts(0), prompts(0), prompts(1)
    assert first == again and first != later
    assert all(p.startswith("sks toy, ") and sorted(p.split(", ")) == sorted(prompt.split(", "))
               for p in first + later)


# -- training runs -----------------------------------------------------------------------------------
E2E_TOML = """
[general]
resolution = 32
batch_size = 2
shuffle_caption = true
keep_tokens = 1
caption_extension = '.txt'
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16

[[datasets]]
  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'

  [[datasets.subsets]]
  image_dir = '{root}/reg'
  class_tokens = 'girl'
  is_reg = true
"""


@pytest.mark.slow
def test_two_concepts_and_a_reg_subset_train_through_accelerate_launch(folders, tmp_path, tiny_sd, launch):
    """Two concepts (one repeated twice, tags shuffled after the first) and a regularisation subset, with
    buckets, cached latents and a held-out image: training runs, the LoRA moves off zero, the
    validation loss is logged, and the kohya file's header names each subset with its repeats and tags."""
    from safetensors import safe_open

    path = write_toml(folders, "e2e.toml", E2E_TOML)
    out = tmp_path / "out"
    proc = launch(["--pretrained_model_name_or_path", tiny_sd, "--dataset_config", path, "--output_dir", str(out),
                   "--seed", "0", "--mixed_precision", "no", "--report_to", "none", "--max_train_steps", "3",
                   "--cache_latents", "--validation_split", "0.2", "--validation_loss_steps", "3",
                   "--prior_loss_weight", "0.5"], threads=2)
    assert "found 5 instance image(s)" in proc.stderr and "found 4 regularisation image(s)" in proc.stderr
    assert "holding out 1 of 5 instance image(s)" in proc.stderr and "aspect-ratio buckets" in proc.stderr
    assert "finished at step 3" in proc.stdout and "verified: " in proc.stdout
    assert len((out / "validation_loss.jsonl").read_text().splitlines()) == 2  # before the first step, after the last
    with safe_open(str(out / f"{out.name}.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        ups = [fh.get_tensor(k) for k in fh.keys() if k.endswith("lora_up.weight")]
    assert ups and all(t.isfinite().all() for t in ups) and any(t.abs().max() > 0 for t in ups)  # B starts at 0
    dirs = json.loads(meta["ss_dataset_dirs"])
    assert set(dirs) == {"hoge", "fuga"} and dirs["hoge"]["n_repeats"] == 2 and dirs["fuga"]["n_repeats"] == 1
    assert dirs["hoge"]["img_count"] + dirs["fuga"]["img_count"] == 4  # one of the five held out
    expected = 2 * dirs["hoge"]["img_count"] + dirs["fuga"]["img_count"]
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == (str(expected), "4")
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 4}}
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["reg"] == {"girl": 4} and tags["fuga"]["fuga boy"] == dirs["fuga"]["img_count"]
    config = json.loads(meta["adaprelora_config"])
    assert config["dataset_config"] == path and config["with_prior_preservation"] and config["train_batch_size"] == 2
    assert meta["ss_resolution"] == "(32, 32)"


@pytest.mark.slow
def test_the_wildcard_example_of_sd_scripts_trains_as_written_and_resumes_exactly(folders, tmp_path, tiny_sd,
                                                                                 one_torch_thread):
    """sd-scripts' `secondary_separator` / wildcard / `keep_tokens_separator` example (1024 px with
    bucket_no_upscale, so the small images keep their size; flips, shuffled tags, tag dropout and
    wildcards all drawn at random), two steps in-process, one per epoch; resumed from step 1 it ends
    with the same weights, so the draws depend only on (seed, epoch, item)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file

    from adaprelora.training.dreambooth import train

    path = example("secondary_separator.toml", folders)

    def run(out, **kw):
        cfg = TrainConfig(pretrained_model_name_or_path=tiny_sd, dataset_config=path, output_dir=str(out),
                          report_to="none", seed=0, max_train_steps=2, mixed_precision="no", checkpointing_steps=1,
                          **kw)
        return list(train(cfg))[-1]

    last = run(tmp_path / "a")
    assert last.done and last.step == 2 and last.outputs["verified"].startswith("verified: ")
    with safe_open(last.outputs["kohya"], framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"image_dir": {"n_repeats": 1, "img_count": 2}}
    assert meta["ss_resolution"] == "(1024, 1024)"
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    resumed = run(tmp_path / "b", resume_from_checkpoint="latest", skip_export_check=True)
    a, b = load_file(last.outputs["kohya"]), load_file(resumed.outputs["kohya"])
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)

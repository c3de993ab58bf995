"""The typed job config: every bad key, type or value is an error that names the key."""

from __future__ import annotations

import pytest

from dpsynth.config import ConfigError, JobConfig, load_config


def test_defaults_are_the_bundled_demo():
    cfg = load_config()
    assert cfg.data.source == "rotten_tomatoes" and cfg.model.base == "smollm2-135m-instruct"
    assert cfg.privacy.accountant == "prv" and cfg.privacy.delta is None  # delta defaults to 1/N^1.1 at run time


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  batch_size: 32\n  learning_rate: 0.001\nlora:\n  r: 4\n")
    cfg = load_config(path, ["training.batch_size=8", "sampling.label_proportions={pos: 2, neg: 1}"])
    assert cfg.training.batch_size == 8 and cfg.training.learning_rate == 0.001 and cfg.lora.r == 4
    assert cfg.sampling.label_proportions == {"pos": 2, "neg": 1}


@pytest.mark.parametrize("override, key", [
    (["training.bogus=1"], "training.bogus: unknown key"),
    (["nonsense=1"], "nonsense: unknown key"),
    (["training.batch_size=zero"], "training.batch_size"),
    (["training.batch_size=0"], "training.batch_size"),
    (["privacy.epsilon=0"], "privacy.epsilon"),
    (["privacy.epsilon=-3"], "privacy.epsilon"),
    (["privacy.epsilon=.inf"], "privacy.epsilon"),
    (["privacy.delta=1.5"], "privacy.delta"),
    (["privacy.accountant=moments"], "privacy.accountant"),
    (["data.test_fraction=0"], "data.test_fraction"),
    (["training.max_grad_norm=.nan"], "training.max_grad_norm"),
    (["sampling.top_p=1.5"], "sampling.top_p"),
    (["sampling.label_proportions={a: -1}"], "sampling.label_proportions"),
    (["model.prefix_template=no label here"], "model.prefix_template"),
    (["lora.target_modules=[]"], "lora.target_modules"),
    (["training.grad_sample_mode=magic"], "training.grad_sample_mode"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match="^config error: " + key.replace(".", r"\.")):
        load_config(None, override)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["training.batch_size"])


def test_training_hash_tracks_what_changes_the_adapter():
    base = load_config()
    assert base.training_hash() == load_config(None, ["sampling.temperature=0.5", "privacy.ledger=/tmp/x.sqlite"]).training_hash()
    assert base.training_hash() != load_config(None, ["training.max_grad_norm=0.5"]).training_hash()
    assert base.training_hash() != load_config(None, ["privacy.epsilon=3"]).training_hash()
    assert base.training_hash() != load_config(None, ["sampling.label_budget_share=0.1"]).training_hash()


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["lora.r=4", "sampling.format=csv"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert isinstance(cfg, JobConfig)


# ---------------------------------------------------------------- presets


def test_cpu_demo_preset_is_the_defaults():
    assert load_config(None, [], preset="cpu-demo") == load_config()


def test_gpu_preset_is_paper_scale():
    cfg = load_config(None, [], preset="gpu")
    assert cfg.lora.last_layers is None  # LoRA on every layer
    assert cfg.training.batch_size >= 512 and cfg.training.epochs >= 2
    assert cfg.sampling.num_examples >= 2000 and cfg.scaling.use_gpu
    assert cfg.evaluation.max_real_examples is None


def test_a_file_and_overrides_apply_on_top_of_a_preset(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  epochs: 1\n")
    cfg = load_config(path, ["sampling.num_examples=99"], preset="gpu")
    assert cfg.training.epochs == 1 and cfg.sampling.num_examples == 99 and cfg.training.batch_size == 512


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(ConfigError, match="preset: unknown preset 'huge' \\(choose cpu-demo, gpu\\)"):
        load_config(None, [], preset="huge")

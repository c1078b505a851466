"""One source of truth for configuration: typed choices checked at load, YAML files against the dataclass
defaults, nested sections as dataclasses, configs written before (config.json, config.yaml) still load,
one attribute name (`.config`) on every model, and the test-only switches in `THREEDPE_TEST_HOOKS`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.datagen import DatagenConfig
from training.config import TrainConfig
from training.customize import CustomizeConfig
from utils.config import from_dict, load_config, to_dict
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DATA = Path(__file__).resolve().parent / "data"

#: configs/*.yaml → the dataclass it fills (None: not a config dataclass; datasets/layout.py reads it)
SCHEMAS = {"train.yaml": TrainConfig, "train_tiny.yaml": TrainConfig, "customize.yaml": CustomizeConfig,
           "customize_tiny.yaml": CustomizeConfig, "datagen.yaml": DatagenConfig, "datagen_tiny.yaml": DatagenConfig,
           "edit_vocabulary.yaml": None}

TINY_TRAIN = "tiny models on a 64² tiny dataset, on CPU, a few steps, everything logged"
TINY_DATAGEN = "tiny random models on CPU, 4 portraits × 2 styles, nothing filtered out"
TINY_CUSTOMIZE = "tiny models (random, or a tiny --base) on 64² pairs, on CPU, a few steps"
#: Every key whose YAML value differs from its dataclass default, and why. A YAML may restate a default
#: (train.yaml lists the released run in full), but a difference that is not listed here is drift.
DIFFERENCES: dict[str, dict[str, str]] = {
    "train.yaml": {
        "model.mae_pretrain": "the released run starts the MAE branch from the official MAE weights; the default "
                              "'' (random MAE branch) is the original code's behaviour",
        "model.render_chunk": "checkpointed rendering, 2 views per chunk, so a 512² run fits in memory; the "
                              "default 0 keeps every view's graph (the original)",
    },
    "customize.yaml": {},
    "customize_tiny.yaml": {k: TINY_CUSTOMIZE for k in (
        "base", "train.name", "train.device", "train.max_steps", "train.data.resolution", "train.data.workers",
        "train.model.tiny", "train.model.init_checkpoint", "train.log.log_interval", "train.log.image_interval",
        "train.log.save_interval", "train.log.image_size")},
    "datagen.yaml": {
        "source.seeds": "the full dataset: 10,000 EG3D portraits (the default is a 1,000-portrait run)",
        "source.files_per_dir": "10,000 inputs go into folders of 1,000 (the default writes one folder)",
        "edit.image_guidance_scales": "two image-guidance variants per (portrait, style); the CLIP filter keeps "
                                      "the best (the default tries one)",
        "batch_size": "GPU run: 8 inputs per step (the default 4)",
    },
    "train_tiny.yaml": {k: TINY_TRAIN for k in (
        "name", "seed", "epochs", "max_steps", "device", "data.train_root", "data.val_root", "data.val_fraction",
        "data.resolution", "data.val_batch_size", "data.val_batches", "data.workers", "model.tiny",
        "model.init_checkpoint", "log.log_interval", "log.image_interval", "log.val_interval", "log.save_interval",
        "log.keep_last", "log.image_size")},
    "datagen_tiny.yaml": {k: TINY_DATAGEN for k in (
        "source.network", "source.seeds", "edit.edit_types", "edit.instructions_per_edit", "edit.model",
        "edit.steps", "edit.resolution", "filter.clip_model", "filter.min_directional",
        "filter.min_image_similarity", "output_dir", "batch_size", "device", "fp16", "progress")},
}


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    """'a.b.c' → value for every non-mapping value of a nested mapping."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(name: str) -> dict[str, tuple[object, object]]:
    """Keys of configs/<name> whose value (as loaded) differs from the dataclass default: key → (default, yaml)."""
    cls = SCHEMAS[name]
    defaults = _leaves(to_dict(cls()))
    loaded = _leaves(to_dict(load_config(cls, CONFIGS / name)))
    in_file = _leaves(yaml.safe_load((CONFIGS / name).read_text()) or {})
    return {k: (defaults[k], loaded[k]) for k in in_file if loaded[k] != defaults[k]}


def test_every_config_file_has_a_schema():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SCHEMAS)


@pytest.mark.parametrize("name", sorted(DIFFERENCES))
def test_yaml_differs_from_the_defaults_only_where_pinned(name):
    found = _differences(name)
    assert sorted(found) == sorted(DIFFERENCES[name]), (
        f"configs/{name} vs {SCHEMAS[name].__name__} defaults (default, yaml): "
        f"{ {k: v for k, v in found.items() if k not in DIFFERENCES[name]} }; "
        f"pinned but equal now: {sorted(set(DIFFERENCES[name]) - set(found))}")


# ------------------------------------------------------------------------------------------ choices
@pytest.mark.parametrize("cls, name, override, message", [
    (TrainConfig, "train.yaml", "optim.schedule=cosin", "optim.schedule: 'cosin' is not one of 'constant', 'cosine'"),
    (TrainConfig, "train.yaml", "model.prompt_encoder=bert",
     "model.prompt_encoder: 'bert' is not one of 'mae', 'clip'"),
    (DatagenConfig, "datagen.yaml", "source.kind=photo", "source.kind: 'photo' is not one of 'eg3d', 'photos'"),
    (DatagenConfig, "datagen.yaml", "source.camera=random", "source.camera: 'random' is not one of"),
    (DatagenConfig, "datagen.yaml", "filter.on_all_filtered=keep", "filter.on_all_filtered: 'keep' is not one of"),
    (CustomizeConfig, "customize.yaml", "ip2p.dtype=fp8", "ip2p.dtype: 'fp8' is not one of 'auto'"),
])
def test_a_value_outside_the_choices_fails_when_the_config_loads(cls, name, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(cls, CONFIGS / name, [override])
    assert str(e.value).startswith(f"command-line override '{override}': {message}")


def test_an_error_names_where_the_key_came_from(tmp_path):
    """An unknown key or bad value from an override names the override, not the config file; one from the file
    names the file."""
    tiny = CONFIGS / "train_tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, tiny, ["name=ok", "foo.bar=1"])
    assert str(e.value).startswith("command-line override 'foo.bar=1': unknown key 'foo' (valid: bf16, data,")
    assert "train_tiny.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^command-line override 'optim.lr=fast': optim.lr: expected float"):
        load_config(TrainConfig, tiny, ["optim.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny.read_text() + "foo:\n  bar: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, bad, ["foo.bar=2"])  # the file is wrong already
    assert str(e.value).startswith(f"{bad}: unknown key 'foo'")


def test_a_quoted_choice_loads():
    assert load_config(DatagenConfig, CONFIGS / "datagen.yaml", ["distributed='off'"]).distributed == "off"
    assert load_config(TrainConfig, CONFIGS / "train.yaml", ["optim.schedule=cosine"]).optim.schedule == "cosine"


def test_a_bad_choice_stops_training_before_any_model_is_built(monkeypatch):
    import training.train as train

    def build_training(*a, **k):
        raise AssertionError("models were built")

    monkeypatch.setattr(train, "build_training", build_training)
    with pytest.raises(ConfigError, match="optim.schedule: 'cosin' is not one of 'constant', 'cosine'"):
        train.run(str(CONFIGS / "train_tiny.yaml"), ["optim.schedule=cosin"])


def test_configs_built_in_code_check_their_choices():
    from models.editing.editing_encoder import EditingEncoderConfig
    from models.live3d.encoder import Live3DConfig

    with pytest.raises(ConfigError, match="Live3DConfig.mode: 'X' is not one of 'LT', 'Normal'"):
        Live3DConfig(mode="X")
    with pytest.raises(ConfigError, match="prompt_encoder: 'bert' is not one of 'mae', 'clip'"):
        EditingEncoderConfig(prompt_encoder="bert")


# ------------------------------------------------------------------------------------ nested sections
def test_nested_sections_are_dataclasses():
    from models.editing.clip_prompt import ClipPromptConfig
    from models.editing.editing_encoder import EditingEncoderConfig
    from pipelines.instruct_pix2pix import InstructPix2PixConfig

    cfg = load_config(CustomizeConfig, CONFIGS / "customize.yaml", ["ip2p.steps=7"])
    assert cfg.ip2p == InstructPix2PixConfig(steps=7)
    enc = from_dict(EditingEncoderConfig,
                    {"prompt_encoder": "clip", "token_dim": 64, "clip": {"model_name": "ViT-B-32"}})
    assert enc.clip == ClipPromptConfig(model_name="ViT-B-32", token_dim=64)  # one width: the encoder's
    with pytest.raises(ConfigError, match="clip: unknown key 'modelname'"):
        from_dict(EditingEncoderConfig, {"clip": {"modelname": "ViT-B-32"}})


def test_project_config_json_written_before_still_loads(tmp_path):
    """tests/data/project_config_v1.json: config.json of a tiny CLIP 3DPE model as written before `clip` became
    a ClipPromptConfig (a plain dict without token_dim)."""
    from models.checkpoint import build_models, load_checkpoint, save_pretrained
    from models.discriminator import DiscriminatorConfig, EditingDualDiscriminator
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.eg3d.config import RendererConfig
    from models.eg3d.triplane_renderer import TriplaneRenderer

    pytest.importorskip("open_clip")
    old = json.loads((DATA / "project_config_v1.json").read_text())
    cfgs = {"encoder": from_dict(EditingEncoderConfig, old["config"]["encoder"]),
            "renderer": from_dict(RendererConfig, old["config"]["renderer"]),
            "discriminator": from_dict(DiscriminatorConfig, old["config"]["discriminator"])}
    enc = cfgs["encoder"]
    assert enc.prompt_encoder == "clip" and enc.clip.token_dim == enc.token_dim == 32
    assert enc.clip.model_cfg == old["config"]["encoder"]["clip"]["model_cfg"] and enc.clip.image_size == 32
    torch.manual_seed(0)
    comps = {"encoder": EditingEncoder(cfgs["encoder"]).state_dict(),
             "renderer": TriplaneRenderer(cfgs["renderer"]).state_dict(),
             "discriminator": EditingDualDiscriminator(cfgs["discriminator"]).state_dict()}
    ck = save_pretrained(tmp_path / "ck", comps, "3dpe", cfgs, {"test": True})
    (Path(ck) / "config.json").write_text(json.dumps(old))  # the old file, as written then
    loaded = load_checkpoint(ck)
    assert loaded.configs == cfgs
    models = build_models(loaded)
    for comp, sd in comps.items():
        built = models[comp].state_dict()
        assert all(torch.equal(built[k], v) for k, v in sd.items()), comp


# ------------------------------------------------------------------------------------ retired keys
def test_a_run_config_saved_before_still_loads():
    """tests/data/train_config_v1.yaml: config.yaml of a train_tiny run saved before the test-only switches
    (stop_after, model.allow_random_init, loss.lpips_random_backbone, loss.id_random_init) left TrainConfig."""
    saved = yaml.safe_load((DATA / "train_config_v1.yaml").read_text())
    assert "stop_after" in saved and "allow_random_init" in saved["model"] and "id_random_init" in saved["loss"]
    cfg = load_config(TrainConfig, DATA / "train_config_v1.yaml")
    assert cfg == load_config(TrainConfig, CONFIGS / "train_tiny.yaml", ["log.tqdm=false"])  # progress: on since


@pytest.mark.parametrize("override, hint", [
    ("stop_after=2", "'stop_after' is no longer a setting: tests set stop_after in THREEDPE_TEST_HOOKS"),
    ("model.allow_random_init=true", "model: 'allow_random_init' is no longer a setting"),
    ("loss.lpips_random_backbone=true", "loss: 'lpips_random_backbone' is no longer a setting: model.tiny=true"),
])
def test_a_retired_key_given_now_says_what_replaced_it(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config(TrainConfig, CONFIGS / "train_tiny.yaml", [override])


# ------------------------------------------------------------------------------------ .config
def test_every_model_exposes_its_config_as_config():
    from models.discriminator import DiscriminatorConfig, EditingDualDiscriminator
    from models.editing.editing_encoder import EditingEncoder, EditingEncoderConfig
    from models.editing.mae import MAEViT, MAEViTConfig
    from models.eg3d.config import GeneratorConfig, RendererConfig
    from models.eg3d.generator import TriPlaneGenerator
    from models.eg3d.triplane_renderer import TriplaneRenderer
    from models.live3d.encoder import Live3DConfig, Live3DEncoder
    from training.losses import DistillationLoss, LossConfig

    renderer = TriplaneRenderer(RendererConfig.tiny())
    models = {renderer: RendererConfig.tiny(), renderer.renderer: RendererConfig.tiny().rendering,
              TriPlaneGenerator(GeneratorConfig.tiny()): GeneratorConfig.tiny(),
              EditingDualDiscriminator(DiscriminatorConfig.tiny()): DiscriminatorConfig.tiny(),
              MAEViT(MAEViTConfig.tiny()): MAEViTConfig.tiny(),
              EditingEncoder(EditingEncoderConfig.tiny()): EditingEncoderConfig.tiny(),
              Live3DEncoder(Live3DConfig.tiny()): Live3DConfig.tiny(),
              DistillationLoss(LossConfig(lpips=0.0)): LossConfig(lpips=0.0)}
    try:
        import open_clip  # noqa: F401

        clip = EditingEncoder(EditingEncoderConfig.tiny("clip"))
        models[clip.prompt_encoder] = EditingEncoderConfig.tiny("clip").clip
    except ImportError:
        pass
    for model, cfg in models.items():
        assert model.config == cfg, type(model).__name__
        assert not hasattr(model, "cfg"), type(model).__name__


# ------------------------------------------------------------------------------------ test hooks
def test_test_hooks_come_from_one_environment_variable(monkeypatch):
    from utils import testing_hooks

    monkeypatch.delenv(testing_hooks.ENV, raising=False)
    assert testing_hooks.hooks() == testing_hooks.Hooks()
    with testing_hooks.enabled(stop_after=3, random_loss_nets=True) as h:
        assert h == testing_hooks.hooks() == testing_hooks.Hooks(stop_after=3, random_loss_nets=True)
    assert testing_hooks.ENV not in os.environ
    monkeypatch.setenv(testing_hooks.ENV, "{stop_after: 2}")
    with pytest.raises(ConfigError, match="THREEDPE_TEST_HOOKS is not valid JSON"):
        testing_hooks.hooks()
    monkeypatch.setenv(testing_hooks.ENV, '{"stop_afer": 2}')
    with pytest.raises(ConfigError, match="THREEDPE_TEST_HOOKS: unknown key 'stop_afer'"):
        testing_hooks.hooks()
    with pytest.raises(ConfigError, match="unknown key 'allow_random_init'"):
        testing_hooks.env(allow_random_init=True)

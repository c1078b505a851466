"""One source of truth for configuration: the dataclasses hold every default (each field documented), a YAML in
configs/ holds only what differs from them (each key with its reason), `--print-config` shows the resolved
whole; typed choices checked at load, nested sections as dataclasses, configs written before (config.json,
config.yaml) still load, one attribute name (`.config`) on every model, and the test-only switches in
`THREEDPE_TEST_HOOKS`."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.datagen import DatagenConfig
from training.config import TrainConfig
from training.customize import CustomizeConfig
from utils.config import from_dict, load_config, to_dict
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DATA = Path(__file__).resolve().parents[1] / "data"

#: configs/*.yaml → the dataclass it fills (None: not a config dataclass; datasets/layout.py reads it)
SCHEMAS = {"train.yaml": TrainConfig, "train_tiny.yaml": TrainConfig, "customize.yaml": CustomizeConfig,
           "customize_tiny.yaml": CustomizeConfig, "datagen.yaml": DatagenConfig, "datagen_tiny.yaml": DatagenConfig,
           "edit_vocabulary.yaml": None}
CONFIG_FILES = sorted(name for name, cls in SCHEMAS.items() if cls is not None)
#: `to_dict(load_config(schema, configs/<name>))` of every config file, recorded before the YAML files were cut
#: down to their differences (issue #25): what a run resolves must not move when a YAML or a default is edited.
RESOLVED = DATA / "resolved_configs.json"


def _leaves(data: dict, prefix: str = "") -> dict[str, object]:
    """'a.b.c' → value for every non-mapping value (and every empty mapping) of a nested mapping."""
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _restated(cls: type, path: Path) -> list[str]:
    """The keys of the YAML at `path` whose value, as loaded, equals `cls`'s default (an empty section too)."""
    defaults = _leaves(to_dict(cls()))
    loaded = _leaves(to_dict(load_config(cls, path)))
    in_file = _leaves(yaml.safe_load(path.read_text()) or {})
    return sorted(k for k in in_file if k not in defaults or loaded[k] == defaults[k])


def _keys_without_reason(path: Path) -> list[str]:
    """The lines of the YAML at `path` that set a value (not a section header) with no comment on them."""
    setting = re.compile(r"^\s*[\w.-]+:\s*[^\s#]")
    return [line for line in path.read_text().splitlines() if setting.match(line) and "#" not in line]


def test_every_config_file_has_a_schema():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SCHEMAS)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_a_yaml_holds_only_what_differs_from_the_defaults(name):
    restated = _restated(SCHEMAS[name], CONFIGS / name)
    assert not restated, f"configs/{name} restates {SCHEMAS[name].__name__}'s defaults (delete them): {restated}"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_each_key_of_a_yaml_says_why(name):
    assert _keys_without_reason(CONFIGS / name) == [], f"configs/{name}: give each key its reason in a comment"


def test_the_yaml_checks_catch_a_restated_default_and_a_key_without_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 42   # the default\nmodel:\n  tiny: true\n")
    assert _restated(TrainConfig, bad) == ["seed"]
    assert _keys_without_reason(bad) == ["  tiny: true"]
    bad.write_text("base: ''  # none\nip2p: {}  # an empty section restates the defaults too\n")
    assert _restated(CustomizeConfig, bad) == ["ip2p"]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_the_resolved_config_of_each_file_is_unchanged(name):
    recorded = json.loads(RESOLVED.read_text())
    assert sorted(recorded) == CONFIG_FILES
    assert to_dict(load_config(SCHEMAS[name], CONFIGS / name)) == recorded[name]


def test_the_defaults_live_in_one_place():
    """LossConfig is a section of training/config.py, which imports no loss code; the customisation focal is the
    camera module's constant."""
    from training import losses
    from training.config import LossConfig
    from utils.cameras import FOCAL_EG3D_LABEL

    assert losses.LossConfig is LossConfig and TrainConfig().loss == LossConfig()
    tree = ast.parse((ROOT / "training" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "training.losses" not in imported
    assert CustomizeConfig().default_focal == FOCAL_EG3D_LABEL


# ------------------------------------------------------------------------------------ --print-config
@pytest.mark.parametrize("argv, cls, config, overrides", [
    (["train", "--config", str(CONFIGS / "train.yaml"), "name=x"], TrainConfig, "train.yaml", ["name=x"]),
    (["train", "--config", str(CONFIGS / "train_tiny.yaml"), "name=x", "--resume"], TrainConfig, "train_tiny.yaml",
     ["name=x", "resume=auto"]),
    (["datagen", "--config", str(CONFIGS / "datagen_tiny.yaml"), "batch_size=3"], DatagenConfig, "datagen_tiny.yaml",
     ["batch_size=3"]),
    (["datagen", "batch_size=3"], DatagenConfig, "datagen.yaml", ["batch_size=3"]),  # its default config file
    (["customize", "--pairs", "DIR", "--name", "mine", "train.max_steps=5"], CustomizeConfig, "customize.yaml",
     ["train.max_steps=5", "pairs=DIR", "train.name=mine"]),
])
def test_print_config_prints_the_whole_resolved_config_and_runs_nothing(argv, cls, config, overrides, tmp_path,
                                                                        monkeypatch, capsys):
    import train_scripts

    monkeypatch.chdir(tmp_path)  # anything a run would write (exps/, data/) would land here
    assert train_scripts.main([*argv, "--print-config"]) == 0
    out = capsys.readouterr()
    expected = load_config(cls, CONFIGS / config, overrides)
    assert yaml.safe_load(out.out) == to_dict(expected) and out.err == ""  # every key, not only the file's
    printed = tmp_path / "printed.yaml"
    printed.write_text(out.out)
    assert load_config(cls, printed) == expected  # it loads back to the same config
    assert list(tmp_path.iterdir()) == [printed]


def test_print_config_with_a_bad_key_is_one_error_line(capsys):
    import train_scripts

    assert train_scripts.main(["train", "--config", str(CONFIGS / "train.yaml"), "optim.lr=fast",
                               "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: command-line override 'optim.lr=fast': optim.lr: expected float, got 'fast'"]


def test_print_config_from_the_command_line():
    proc = subprocess.run([sys.executable, "train_scripts.py", "train", "--config", "configs/train.yaml", "name=x",
                           "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load(proc.stdout) == to_dict(load_config(TrainConfig, CONFIGS / "train.yaml", ["name=x"]))


def test_a_run_keeps_the_printed_config_as_its_record(tmp_path, capsys):
    """exps/<name>/config.yaml is the text --print-config shows for the same command."""
    import train_scripts
    from tests.training.test_training import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n_portraits=2, styles=("anime",))
    argv = ["train", "--config", str(CONFIGS / "train_tiny.yaml"), f"data.train_root={data}",
            f"exp_dir={tmp_path / 'exps'}", "name=rec", "max_steps=1", "data.val_fraction=0", "gan.enabled=false",
            "loss.multiview=false", "loss.lpips=0", "export_3dpe=false", "log.image_interval=1000",
            "log.val_interval=1000", "log.save_interval=1000"]
    assert train_scripts.main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert train_scripts.main(argv) == 0
    assert (tmp_path / "exps" / "rec" / "config.yaml").read_text() == printed


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
    assert str(e.value).startswith("command-line override 'foo.bar=1': unknown key 'foo' (valid: bf16, compile, data,")
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
    ("stop_after=2", "'stop_after' is no longer a setting: stop a run with SIGTERM or Ctrl-C"),
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
    with testing_hooks.enabled(random_init=True, random_loss_nets=True) as h:
        assert h == testing_hooks.hooks() == testing_hooks.Hooks(random_init=True, random_loss_nets=True)
    assert testing_hooks.ENV not in os.environ
    monkeypatch.setenv(testing_hooks.ENV, "{random_init: true}")
    with pytest.raises(ConfigError, match="THREEDPE_TEST_HOOKS is not valid JSON"):
        testing_hooks.hooks()
    monkeypatch.setenv(testing_hooks.ENV, '{"random_int": true}')
    with pytest.raises(ConfigError, match="THREEDPE_TEST_HOOKS: unknown key 'random_int'"):
        testing_hooks.hooks()
    with pytest.raises(ConfigError, match="unknown key 'allow_random_init'"):
        testing_hooks.env(allow_random_init=True)
    # nothing in the training or datagen loop: tests break runs from outside (a signal, a killed process)
    for loop_hook in ("stop_after", "kill_rank_at_step", "kill_while_saving", "kill_rank_after_units"):
        with pytest.raises(ConfigError, match=f"unknown key '{loop_hook}'"):
            testing_hooks.env(**{loop_hook: 1})

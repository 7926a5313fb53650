"""Settings are resolved once: every RunConfig field has a flag (or is a YAML-only site
setting), a YAML key and a line in --help, and a typed flag wins over --config."""

from __future__ import annotations

import re

import pytest
import yaml
from click.testing import CliRunner

from unetflow import config
from unetflow.cli import main
from unetflow.cli import segment as segment_cli

# path -> (command-line words, the value they give). Every CLI setting must have a row:
# a new field of RunConfig fails test_every_setting_has_a_row until it has one.
FLAGS = {
    "tiling.block_shape": (["--block-shape", "64,64"], (64, 64)),
    "tiling.patch_shape": (["--patch-shape", "32"], (32,)),
    "tiling.blend": (["--blend", "crop"], "crop"),
    "tiling.overlap": (["--overlap", "0.5"], 0.5),
    "tiling.halo": (["--halo", "4,4"], (4, 4)),
    "tiling.allow_small_halo": (["--allow-small-halo"], True),
    "tiling.mirror": (["--mirror", "symmetric"], "symmetric"),
    "tiling.batch_size": (["--batch-size", "3"], 3),
    "output_settings.kind": (["--output", "labels"], "labels"),
    "output_settings.dtype": (["--dtype", "float16"], "float16"),
    "output_settings.chunk_shape": (["--chunk-shape", "16,16"], (16, 16)),
    "output_settings.shard_shape": (["--shard-shape", "32,32"], (32, 32)),
    "output_settings.overwrite": (["--overwrite"], True),
    "output_settings.ome": (["--ome"], True),
    "output_settings.interior_threshold": (["--interior-threshold", "0.7"], 0.7),
    "output_settings.write_threads": (["--write-threads", "3"], 3),
    "output_settings.image": (["--image", "link"], "link"),
    "cluster.workers": (["--workers", "3"], 3),
    "cluster.gpus": (["--gpus", "2"], 2),
    "cluster.processes": (["--processes"], True),
    "cluster.address": (["--scheduler", "tcp://h:8786"], "tcp://h:8786"),
    "device": (["--device", "cpu"], "cpu"),
    "amp": (["--no-amp"], False),
    "dry_run": (["--dry-run"], True),
    "skip.empty": (["--skip-empty"], True),
    "skip.threshold": (["--skip-threshold", "5"], 5.0),
    "skip.mask": (["--mask", "m.zarr"], "m.zarr"),
    "compile": (["--compile"], True),
    "level": (["--level", "2"], 2),
    "resume": (["--resume"], True),
    "part": (["--part", "2/3"], (2, 3)),
    "nan_value": (["--nan-value", "0"], 0.0),
    "tuning": (["--tuning"], True),
    "trust_model_code": (["--trust-model-code"], True),
}


def get(cfg, path):
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def nested(key, value):
    head, _, rest = key.partition(".")
    return {head: nested(rest, value) if rest else value}


@pytest.fixture
def captured(monkeypatch):
    """Run `unetflow segment` up to the RunConfig it builds; return that config."""
    seen = []

    def fake(cfg, *, progress):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(segment_cli, "_segment", fake)

    def invoke(args, files=None):
        result = CliRunner().invoke(main, ["segment", "in.zarr", "out.zarr", "--model", "m.pt", *args])
        assert result.exit_code == 0, result.output
        return seen.pop()

    return invoke


def test_every_setting_has_a_row():
    cli_settings = {s.path for s in config.settings() if s.cli is True}
    assert cli_settings == set(FLAGS), f"settings without a row in FLAGS: {cli_settings - set(FLAGS)}; rows without a setting: {set(FLAGS) - cli_settings}"


def test_every_setting_has_a_flag_and_a_help_line():
    params = {p.name: p for p in segment_cli.segment.params}
    help_text = CliRunner().invoke(main, ["segment", "--help"]).output
    for s in config.settings():
        if s.cli is not True:
            continue
        assert s.param in params, f"setting {s.path} has no flag: declare it with setting_option(..., path={s.path!r})"
        for opt in params[s.param].opts + params[s.param].secondary_opts:
            assert re.search(rf"{re.escape(opt)}\b", help_text), f"{opt} ({s.path}) missing from segment --help"


@pytest.mark.parametrize("path", sorted(FLAGS))
def test_every_setting_has_a_yaml_key(path):
    s = config.setting(path)
    _, value = FLAGS[path]
    if path.startswith("cluster.") and path != "cluster.address":
        data = nested(s.yaml, value)
        data["cluster"]["kind"] = "local"
    else:
        data = nested(s.yaml, list(value) if isinstance(value, tuple) and path != "part" else value)
    if path == "part":
        data = {"part": "2/3"}
    cfg = config.run_config_from_mapping(data, input="a", output="b", model="m")
    assert get(cfg, path) == value


def test_site_settings_are_yaml_only_and_load():
    site = [s for s in config.settings() if s.cli is False]
    assert {s.path for s in site} >= {"cluster.queue", "cluster.account", "cluster.walltime", "output_settings.compression_level"}
    cfg = config.run_config_from_mapping({"cluster": {"kind": "slurm", "queue": "gpu"}, "output": {"compression_level": 5}},
                                         input="a", output="b", model="m")
    assert cfg.cluster.queue == "gpu" and cfg.output_settings.compression_level == 5


@pytest.mark.parametrize("path", sorted(FLAGS))
def test_a_typed_flag_wins_over_the_config_file(path, captured, tmp_path):
    args, value = FLAGS[path]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"tiling": {"overlap": 0.1}, "cluster": {"kind": "slurm", "queue": "q"}}))
    cfg = captured([*args, "--config", str(cfg_file)])
    assert get(cfg, path) == value
    if path != "tiling.overlap":
        assert cfg.tiling.overlap == 0.1  # the file's settings stay where no flag was typed
    if not path.startswith("cluster."):
        assert cfg.cluster.kind == "slurm" and cfg.cluster.queue == "q"


def test_config_file_with_level_and_ome_keeps_both(captured, tmp_path):
    """The regression: --config run.yaml --level 2 --ome ran level 0 without OME output."""
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("tiling: {blend: gaussian}\n")
    cfg = captured(["--config", str(cfg_file), "--level", "2", "--ome"])
    assert cfg.level == 2 and cfg.output_settings.ome is True


def test_yaml_sets_skip_level_and_compile():
    cfg = config.run_config_from_mapping({"skip": {"empty": True, "threshold": 3}, "level": 1, "compile": True},
                                         input="a", output="b", model="m")
    assert cfg.skip.empty and cfg.skip.threshold == 3 and cfg.level == 1 and cfg.compile


def test_untyped_flags_leave_the_specs_defaults(captured):
    assert captured([]) == config.RunConfig(input="in.zarr", output="out.zarr", model="m.pt")


def test_shapes_are_parsed_by_the_specs_once():
    t = config.TilingSpec(block_shape="64x32", patch_shape=16, halo=[2, 2])
    assert (t.block_shape, t.patch_shape, t.halo) == ((64, 32), (16,), (2, 2))
    assert config.fit_shape(t.patch_shape, 3, what="patch shape") == (16, 16, 16)
    with pytest.raises(config.ShapeError, match="has 2 axes but the image has 3"):
        config.fit_shape(t.block_shape, 3, what="block shape")
    with pytest.raises(config.ConfigError, match="not a list of integers"):
        config.OutputSettings(chunk_shape="a,b")


def test_unknown_yaml_keys_get_a_did_you_mean():
    with pytest.raises(config.ConfigError, match="did you mean 'level'"):
        config.run_config_from_mapping({"levle": 2}, input="a", output="b", model="m")
    with pytest.raises(config.ConfigError, match="did you mean 'empty'"):
        config.run_config_from_mapping({"skip": {"emtpy": True}}, input="a", output="b", model="m")

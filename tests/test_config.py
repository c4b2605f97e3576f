"""The typed config: defaults, TOML round trip, validation messages that name the key."""

from __future__ import annotations

import pytest

from mriflow.config import Config, ConfigError, load_config


def test_defaults_cover_every_step():
    config = Config()
    assert config.spatial.voxel_size == 1.0
    assert config.spatial.image_interpolation == "linear"
    assert config.export.target_shape == [160, 192, 160]
    assert config.registration.template == "MNI152NLin2009aSym"
    assert config.execution.plugin == "MultiProc"


def test_toml_round_trip_reproduces_the_config(tmp_path):
    config = Config()
    config.set("spatial.voxel_size", "1.5")
    config.set("export.target_shape", "128,128,128")
    config.set("seed", 7)
    path = config.write(tmp_path / "mriflow_config.toml")
    again = load_config(path)
    assert again == config
    assert again.spatial.voxel_size == 1.5
    assert again.export.target_shape == [128, 128, 128]


def test_partial_toml_keeps_other_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[spatial]\nvoxel_size = 2\n[intensity]\nmethod = "nyul"\n')
    config = load_config(path)
    assert config.spatial.voxel_size == 2.0 and isinstance(config.spatial.voxel_size, float)
    assert config.intensity.method == "nyul"
    assert config.n4 == Config().n4


@pytest.mark.parametrize(
    "text,match",
    [
        ("[spatial]\nvoxelsize = 2\n", "unknown setting 'spatial.voxelsize'"),
        ('[spatial]\nimage_interpolation = "cubic"\n', "'spatial.image_interpolation'"),
        ('[spatial]\nvoxel_size = "big"\n', "'spatial.voxel_size' must be float"),
        ("spatial = 3\n", "'spatial' must be a table"),
        ("[spatial\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_unsupported_template_is_refused_not_ignored(tmp_path):
    """Any template but the embedded one would silently give MNI152NLin2009aSym outputs."""
    path = tmp_path / "other_template.toml"
    path.write_text('[registration]\ntemplate = "MNI152NLin6Asym"\n')
    with pytest.raises(ConfigError, match="'registration.template' = 'MNI152NLin6Asym'") as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "MNI152NLin2009aSym" in message and "\n" not in message
    with pytest.raises(ConfigError, match="registration.template"):
        Config().set("registration.template", "MNI152NLin6Asym")
    path.write_text('[registration]\ntemplate = "MNI152NLin2009aSym"\n')
    assert load_config(path).registration.template == "MNI152NLin2009aSym"

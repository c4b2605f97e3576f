"""Plugin arguments cannot smuggle commands: validated, never saved, refused in config files."""

from __future__ import annotations

import json
import os
import stat

import pytest

from mriflow.cli.run import main
from mriflow.config import Config, ConfigError, load_config
from tests.helpers import make_bids_dataset

MALICIOUS = "--time=1 ; touch {marker} #"


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that records every call (none may happen)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    script = bindir / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "Submitted batch job 1"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("key", ["sbatch_args", "qsub_args"])
def test_malicious_plugin_args_on_the_command_line_execute_nothing(
    tmp_path, capsys, fake_sbatch, key
):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    marker = tmp_path / "PWNED"
    plugin = "SLURM" if key == "sbatch_args" else "SGE"
    code = main(
        [
            str(root),
            str(tmp_path / "out"),
            "participant",
            "-w",
            str(tmp_path / "work"),
            "--plugin",
            plugin,
            "--plugin-args",
            json.dumps({key: MALICIOUS.format(marker=marker)}),
        ]
    )
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert key in line and "';'" in line
    assert not marker.exists() and not fake_sbatch.exists()
    assert not (tmp_path / "out").exists()  # refused before any work


def test_plugin_args_in_a_config_file_are_refused(tmp_path, capsys, fake_sbatch):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    marker = tmp_path / "PWNED"
    config_file = tmp_path / "mriflow_config.toml"
    config_file.write_text(
        '[execution]\nplugin = "SLURM"\n'
        f'[execution.plugin_args]\nsbatch_args = "{MALICIOUS.format(marker=marker)}"\n'
    )
    code = main([str(root), str(tmp_path / "out"), "participant", "--config", str(config_file)])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(config_file) in line and "--plugin-args" in line
    assert not marker.exists() and not fake_sbatch.exists()
    # even harmless-looking ones: a shared file must not carry what reaches a shell
    config_file.write_text('[execution.plugin_args]\nsbatch_args = "-p short"\n')
    with pytest.raises(ConfigError, match="not read from config files"):
        load_config(config_file)


def test_saved_config_never_carries_plugin_args(tmp_path):
    config = Config()
    config.set("execution.plugin", "SLURM")
    config.set("execution.plugin_args", {"sbatch_args": "-p short --time=1:00:00"})
    path = config.write(tmp_path / "mriflow_config.toml")
    assert "plugin_args" not in path.read_text() and "short" not in path.read_text()
    again = load_config(path)  # and the saved file can be reused as it is
    assert again.execution.plugin == "SLURM" and again.execution.plugin_args == {}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"sbatch_args": "-p short $(reboot)"}, "contains '\\$'"),
        ({"qsub_args": "-q all.q `id`"}, "contains '`'"),
        ({"sbatch_args": "-p short\ntouch x"}, "contains '\\\\n'"),
        ({"sbatch_args": ["-p", "short"]}, "must be a string"),
        ({"n_procs": "many"}, "must be int"),
        ({"n_procs": 0}, "must be positive"),
        ({"mp_context": "thread"}, "is not one of"),
        ({"status_callback": "os.system"}, "unknown plugin argument 'status_callback'"),
        ({"template": "#!/bin/sh\nrm -rf ~"}, "must be an existing file"),
    ],
)
def test_plugin_args_are_validated_in_one_line(args, match):
    config = Config()
    with pytest.raises(ConfigError, match=match) as info:
        config.set("execution.plugin_args", args)
    assert "\n" not in str(info.value)


def test_ordinary_scheduler_arguments_pass():
    config = Config()
    args = {
        "sbatch_args": "--partition=short --time=1:00:00 --mem=4G --exclude=node[01-04]",
        "qsub_args": "-q all.q -l h_vmem=4G,nodes=1:ppn=2 -pe smp 2",
        "n_procs": "4",
        "dont_resubmit_completed_jobs": True,
    }
    config.set("execution.plugin_args", args)
    assert config.execution.plugin_args["n_procs"] == 4


def test_unknown_plugin_is_refused():
    with pytest.raises(ConfigError, match="'execution.plugin' = 'Shell'"):
        Config().set("execution.plugin", "Shell")

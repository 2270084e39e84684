"""The commands' hints name the daemon as it was started: systemd's commands for the package's
configuration, `wadaemon run --config PATH` for any other."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Env

import wadaemon.cli.common as common
from wadaemon.cli import main
from wadaemon.cli.common import daemon_hints
from wadaemon.config import DEFAULT_CONFIG_PATH


def test_the_package_configuration_gets_systemd_commands() -> None:
    hints = daemon_hints(DEFAULT_CONFIG_PATH)
    assert hints.start == "start it with `systemctl start wadaemon`"
    assert "`journalctl -u wadaemon`" in hints.log
    assert hints.command("status") == f"{hints.program} status"


def test_any_other_configuration_gets_wadaemon_run_with_that_path() -> None:
    hints = daemon_hints(Path("local/wadaemon.yaml"))
    run = f"{hints.program} run --config local/wadaemon.yaml"
    assert hints.start == f"start it with `{run}`"
    assert f"the terminal where `{run}` runs" in hints.log
    assert hints.command("status") == f"{hints.program} status --config local/wadaemon.yaml"
    for text in (hints.start, hints.log):
        assert "systemctl" not in text and "journalctl" not in text
    assert "'my dir/w.yaml'" in daemon_hints(Path("my dir/w.yaml")).start  # pasteable


@pytest.mark.parametrize(
    "argv",
    [["status"], ["accounts", "list"], ["accounts", "add", "alice"], ["accounts", "remove", "a"]],
)
def test_commands_that_ask_the_daemon_say_how_to_start_it(
    env: Env, argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if argv[-1] == "a":
        argv = [*argv, "--yes"]
    assert main([*argv, "--config", str(env.config)]) == 3
    err = capsys.readouterr().err
    assert "the daemon is not running" in err
    assert f"start it with `wadaemon run --config {env.config}`" in err, err
    assert "systemctl" not in err

    # the same command with the package's configuration (its path stands in for it here)
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", env.config)
    assert main([*argv, "--config", str(env.config)]) == 3
    err = capsys.readouterr().err
    assert "start it with `systemctl start wadaemon`" in err, err
    assert "--config" not in err

"""pyworker's own settings (``pyworker.config.SETTINGS``): one table behind every place.

Each setting goes from its ``create-worker`` option through ``buildbot.tac`` back into the
:class:`~pyworker.config.WorkerConfig` unchanged; a bad value is refused by the command
line and by the tac reader with the same reason; the README's settings table says what the
table says. Everything runs in process on real files (no worker is started).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
from pathlib import Path

import pytest

from pyworker.cli.main import CreateWorkerOptions, main
from pyworker.cli.tac import TacError, TacOptions, load_tac, make_tac, run_tac
from pyworker.config import (
    AUTO_LEVEL,
    SETTINGS,
    Setting,
    SettingError,
    WorkerConfig,
    valid_level,
)

README = Path(__file__).resolve().parent.parent / "README.md"
IDS = [setting.name for setting in SETTINGS]


def good_values(setting: Setting) -> list[tuple[list[str], object]]:
    """Command-line arguments for ``setting`` and the value the config must then hold."""
    if setting.kind == "flag":
        return [([f"--{setting.option}"], True), ([], False)]
    cases: list[tuple[list[str], object]] = [
        ([f"--{setting.option}={word}"], word) for word in setting.words
    ]
    if setting.low is not None and setting.high is not None:
        for number in sorted({setting.low, (setting.low + setting.high) // 2, setting.high}):
            cases.append(([f"--{setting.option}", str(number)], number))
    cases.append(([f"--{setting.option}=None"], setting.default))
    cases.append(([], setting.default))
    return cases


def bad_values(setting: Setting) -> list[tuple[str | None, str]]:
    """(command-line value or None for a flag, the same value as a tac literal)."""
    if setting.kind == "flag":
        return [(None, "2"), (None, "'yes'"), (None, "-1"), (None, "1.0")]
    cases = [("bogus", "'bogus'"), ("", "''")]
    if setting.low is not None and setting.high is not None:
        cases += [(str(setting.low - 1), str(setting.low - 1)),
                  (str(setting.high + 1), str(setting.high + 1)),
                  ("1.5", "'1.5'")]
    return cases


def create(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]) -> Path:
    tmp_path.mkdir(exist_ok=True)
    basedir = tmp_path / "w"
    assert main(["create-worker", "-q", *args, str(basedir), "h:1", "w", "pw"]) == 0, (
        capsys.readouterr().out
    )
    return basedir


# ---------------------------------------------------------------------------------------
# the table and its users


def test_worker_config_has_one_field_per_setting() -> None:
    fields = {field.name: field for field in dataclasses.fields(WorkerConfig)}
    for setting in SETTINGS:
        assert fields[setting.name].default == setting.default, setting.name
        assert setting.check(setting.default) == setting.default
    assert len({s.name for s in SETTINGS}) == len({s.option for s in SETTINGS}) == len(SETTINGS)


def test_create_worker_options_come_from_the_table() -> None:
    flags = {flag[0]: flag for flag in CreateWorkerOptions.optFlags}
    params = {param[0]: param for param in CreateWorkerOptions.optParameters}
    for setting in SETTINGS:
        if setting.kind == "flag":
            assert flags[setting.option][2] == setting.option_help
            assert setting.option not in params
        else:
            _, short, default, text = params[setting.option]
            assert short is None and text == setting.option_help
            assert default == (None if setting.default is None else str(setting.default))
            assert setting.option not in flags


def test_tac_writer_refuses_what_is_not_a_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'metric_port' is not a pyworker setting"):
        make_tac(TacOptions(str(tmp_path), "h", 1, "w", "pw", settings={"metric_port": 1}))
    with pytest.raises(SettingError, match="must be 'text' or 'json', not 'xml'"):
        make_tac(TacOptions(str(tmp_path), "h", 1, "w", "pw", settings={"log_format": "xml"}))


def test_valid_level_is_the_table_check() -> None:
    # the executor's check of a level (executor/compress.py, commands/transfer.py)
    for fmt, low in (("gz", 0), ("bz2", 1)):
        for value in [*range(-2, 12), AUTO_LEVEL, None, True, False, "3", 3.0, b"auto"]:
            expected = value == AUTO_LEVEL or (type(value) is int and low <= value <= 9)
            assert valid_level(fmt, value) == expected, (fmt, value)


# ---------------------------------------------------------------------------------------
# round trip: create-worker option -> buildbot.tac -> WorkerConfig


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: Setting
) -> None:
    for index, (args, expected) in enumerate(good_values(setting)):
        basedir = create(tmp_path / str(index), capsys, args)
        tac = (basedir / "buildbot.tac").read_text()
        plain = make_tac(TacOptions(str(basedir), "h", 1, "w", "pw"))
        config = load_tac(str(basedir)).config
        assert getattr(config, setting.name) == expected, (args, tac)
        assert type(getattr(config, setting.name)) is type(expected)
        for other in SETTINGS:
            if other is not setting:
                assert getattr(config, other.name) == other.default
        line = setting.tac_line(expected)  # type: ignore[arg-type]
        if expected == setting.default:
            assert line is None and tac == plain
        else:
            assert line is not None and "\nprotocol = 'pb'\n# pyworker settings" in tac
            assert f"\n{line}\n" in tac
            # what the tac writer writes for this value is what create-worker wrote
            opts = TacOptions(str(basedir), "h", 1, "w", "pw", settings={setting.name: expected})
            assert make_tac(opts) == tac


def test_round_trip_all_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args: list[str] = []
    expected: dict[str, object] = {}
    for setting in SETTINGS:
        option_args, value = next((a, v) for a, v in good_values(setting) if v != setting.default)
        args += option_args
        expected[setting.name] = value
    config = load_tac(str(create(tmp_path, capsys, args))).config
    assert {name: getattr(config, name) for name in expected} == expected
    assert all(expected[s.name] != s.default for s in SETTINGS)


# ---------------------------------------------------------------------------------------
# bad values: the same reason from the command line and from the tac reader


def cli_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str], arg: str) -> str:
    assert main(["create-worker", arg, str(tmp_path / "w"), "h:1", "w", "pw"]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{sys.argv[0]}:  ")
    assert not (tmp_path / "w").exists()
    return first[len(f"{sys.argv[0]}:  "):]


def tac_reason(tmp_path: Path, name: str, literal: str) -> str:
    path = str(tmp_path / "buildbot.tac")
    text = make_tac(TacOptions(str(tmp_path), "h", 1, "w", "pw"))
    text = text.replace("protocol = 'pb'\n", f"protocol = 'pb'\n{name} = {literal}\n")
    with pytest.raises(TacError) as info:
        run_tac(text, path)
    return str(info.value)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_bad_values_same_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: Setting
) -> None:
    for cli_value, literal in bad_values(setting):
        reason = f"must be {setting.allowed}, not {literal}"
        with pytest.raises(SettingError, match=re.escape(reason)):
            setting.check(ast.literal_eval(literal))
        assert tac_reason(tmp_path, setting.name, literal) == (
            f"{tmp_path / 'buildbot.tac'}: {setting.name} {reason}"
        )
        if cli_value is not None:
            cli = cli_reason(tmp_path, capsys, f"--{setting.option}={cli_value}")
            assert cli == f"{setting.option} {reason}"


def test_metrics_port_zero_is_refused_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 would listen on a port nobody knows (and reads as "off" to the front end): off is
    None, so 0 is refused by the command line and by the tac reader alike."""
    reason = "must be a TCP port number from 1 to 65535 or None, not 0"
    assert cli_reason(tmp_path, capsys, "--metrics-port=0") == f"metrics-port {reason}"
    assert tac_reason(tmp_path, "metrics_port", "0").endswith(f": metrics_port {reason}")


# ---------------------------------------------------------------------------------------
# the README


def readme_rows() -> list[list[str]]:
    """The cells of the table under README's ``### Settings`` (header and rule left out)."""
    lines = README.read_text().splitlines()
    start = lines.index("### Settings")
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    assert rows[0][:2] == ["tac variable", "create-worker option"], rows[0]
    return rows[2:]


def expected_row(setting: Setting) -> list[str]:
    default = "0" if setting.kind == "flag" else repr(setting.default)
    return [f"`{setting.name}`", f"`--{setting.option}`", setting.allowed, f"`{default}`",
            setting.help]


def test_readme_lists_the_settings() -> None:
    expected = [expected_row(setting) for setting in SETTINGS]
    table = "\n".join("| " + " | ".join(row) + " |" for row in expected)
    assert readme_rows() == expected, f"README.md's settings table should read:\n{table}"

"""The command line itself: shared options, one-line errors for users' mistakes, tracebacks for bugs."""

import io
import re
import sys
from pathlib import Path

import pytest

from flowpp import jobs
from flowpp.cli import build_parser, main
from flowpp.errors import ConfigError


@pytest.mark.parametrize(
    "command, extra",
    [
        ("train", ["--out", "r"]),
        ("eval", ["--run", "r", "--data", "d"]),
        ("sample", ["--run", "r"]),
        ("score", ["--run", "r", "a.png"]),
    ],
)
def test_shared_options_mean_the_same_everywhere(command, extra):
    args = build_parser().parse_args([command, *extra, "--device", "cpu", "--threads", "1", "--seed", "7"])
    assert (args.device, args.threads, args.seed) == ("cpu", 1, 7)


def test_train_defaults_come_from_the_settings():
    from flowpp.training import TrainSettings

    args = build_parser().parse_args(["train", "--out", "r"])
    for name in ("eval_images", "checkpoint_minutes", "keep_checkpoints", "max_bad_steps", "log_every", "progress"):
        assert getattr(args, name) == TrainSettings.default(name), name


def test_a_users_mistake_is_one_line(capsys, monkeypatch):
    def bad(**_):
        raise ConfigError("config 'x': filters must be positive")

    monkeypatch.setattr(jobs, "configs_job", bad)
    assert main(["configs"]) == 2
    assert capsys.readouterr().err == "flowpp: error: config 'x': filters must be positive\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(**_):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(jobs, "configs_job", buggy)
    with pytest.raises(ValueError, match="invariant"):
        main(["configs"])


def test_the_readme_library_example_runs():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## The library\s+```python\n(.*?)```", readme, re.S)
    assert block, "README has no library example"
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert scope["log_p"].shape == scope["bpd"].shape == (scope["x"].shape[0],)
    assert scope["samples"].shape[1:] == (3, 32, 32)
    assert (scope["y"] - (scope["x"] + 0.5)).abs().max() < 1e-2


@pytest.mark.parametrize("flag, value", [("--max-minutes", "-1"), ("--max-minutes", "0"), ("--eval-minutes", "-2"),
                                         ("--checkpoint-minutes", "abc")])  # fmt: skip
def test_minutes_must_make_sense(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--out", "r", flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--out", "r", "--checkpoint-minutes", "0"]).checkpoint_minutes == 0


def test_eval_refuses_an_unwritable_destination_before_computing(tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("evaluated before checking the destination")

    monkeypatch.setattr(jobs, "evaluate_bpd", never)
    monkeypatch.setattr(jobs.os, "access", lambda *a: False)
    assert main(["eval", "--run", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "r.json")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_every_command_line_in_the_readme_parses():
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split("  #")[0])  # comments and [optional] parts
            words = shlex.split(line)
            if words[:1] == ["flowpp"]:
                commands.append(words[1:])
            elif "-m" in words and "flowpp" in words and words[0] in ("torchrun", "python"):
                commands.append(words[words.index("flowpp") + 1 :])
    assert len(commands) >= 12
    for args in commands:
        build_parser().parse_args(args)  # exits (fails the test) on an unknown or misspelt option


def test_output_cut_short_by_its_reader_is_not_an_error(monkeypatch, capsys):
    class ClosedPipe(io.StringIO):  # `flowpp configs | head -1`: head has gone
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["configs"]) == 0
    assert capsys.readouterr().err == ""

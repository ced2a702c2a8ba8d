"""How the command line reads values, and the option groups several commands share.

Each value a user can type is checked here, with one clear line when it cannot work; the kinds
of training settings (``flowpp.training.settings.Option.kind``) map to these parsers.
"""

from __future__ import annotations

import argparse
import dataclasses

from .data.registry import help_text as _named_datasets_help

DATASETS_HELP = (
    f"{_named_datasets_help()}, a path to an .npz file (x_train, x_test, optional x_valid; uint8 NHWC) or a "
    "folder of PNG images"
)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except where the help already says it, or where the default is None or a flag's."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, []) or isinstance(action.default, bool) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def parse_override(text: str) -> tuple[str, object]:
    from .configs import parse_override
    from .errors import ConfigError

    try:
        return parse_override(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"--set: {e}") from None


# Counts a user types are bounded where the libraries underneath take 64-bit (or smaller) integers:
# 10^20 must be one line, not an OverflowError from PyTorch.
LARGEST_COUNT = 10**15
MOST_THREADS = 4096
LARGEST_SEED = 2**32 - 1


def whole_number(text: str, low: int, high: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not low <= v <= high:
        raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high:,}, got {text}")
    return v


def positive_int(text: str) -> int:
    return whole_number(text, 1, LARGEST_COUNT)


def thread_count(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else whole_number(text, 1, MOST_THREADS)


def seed_number(text: str) -> int:
    return whole_number(text, 0, LARGEST_SEED)


def minutes(text: str, allow_zero: bool = False) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not ((v > 0 or (allow_zero and v == 0)) and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a {'non-negative' if allow_zero else 'positive'} number of "
                                         f"minutes, got {text}")  # fmt: skip
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def ratio_or_off(text: str) -> float | None:
    """A factor above 1, or 'off'."""
    if text.strip().lower() == "off":
        return None
    v = positive_float(text)
    if v <= 1:
        raise argparse.ArgumentTypeError(f"expected a factor above 1 (or 'off'), got {text}")
    return v


def minutes_or_off(text: str) -> float:
    """Minutes between events; 0 turns them off."""
    return minutes(text, allow_zero=True)


def option_groups() -> dict[str, argparse.ArgumentParser]:
    """Option groups that several commands share, each declared once."""
    runtime = argparse.ArgumentParser(add_help=False)
    g = runtime.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads for PyTorch, or 'auto' (default: train adapts between all cores and one to the "
        "machine's load, as 'auto' does; the other commands take PyTorch's choice)",
    )
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=seed_number, default=0, help="random seed (noise, data order, dropout, samples)")
    compiled = argparse.ArgumentParser(add_help=False)
    compiled.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the conditioner networks first: faster over many images, after the "
        "first batch of each shape compiles (needs a C++ compiler on CPU)",
    )
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--weights", dest="which", default=None, choices=["best", "last"],
                       help="the run's best model (best.pt, the best validation so far) or its newest checkpoint "
                            "(default: best when the run has one)")  # fmt: skip
    data = argparse.ArgumentParser(add_help=False)
    g = data.add_argument_group("data")
    g.add_argument(
        "--data-dir", default=None, help="where named datasets live (default: $FLOWPP_DATA_DIR or ~/.cache/flowpp/data)"
    )
    g.add_argument(
        "--no-download", dest="download", action="store_false", help="never download; fail if files are missing"
    )
    g.add_argument(
        "--prepare",
        dest="prepared",
        action="store_true",
        default=None,
        help="also prepare an .npz file or PNG folder: decoded once into memory-mapped arrays under "
        "DATA_DIR/prepared (named datasets always are, on first use; a current preparation made before, "
        "e.g. by flowpp prepare, is used without this)",
    )
    g.add_argument("--no-prepare", dest="prepared", action="store_false", help="read the data into memory, unprepared")
    return dict(runtime=runtime, seed=seed, compile=compiled, data=data, which=which)


# How each kind of setting (flowpp.training.settings.Option.kind) is parsed.
SETTING_KINDS = {
    "positive_int": dict(type=positive_int),
    "positive_float": dict(type=positive_float),
    "minutes_or_off": dict(type=minutes_or_off),
    "ratio_or_off": dict(type=ratio_or_off),
    "flag": dict(action="store_true"),
    "off_flag": dict(action="store_false"),
    "required": dict(required=True),
}


def add_settings(settings_class, groups: dict[str, argparse._ArgumentGroup]) -> None:
    """An option for every field of ``settings_class`` that declares one (its ``option`` metadata)."""
    for f in dataclasses.fields(settings_class):
        option = f.metadata.get("option")
        if option is None:
            continue
        kwargs = dict(SETTING_KINDS[option.kind], dest=f.name, help=option.help)
        if option.kind not in ("flag", "off_flag", "required"):
            kwargs["default"] = f.default
        if option.metavar:
            kwargs["metavar"] = option.metavar
        groups[option.group].add_argument(option.flag or "--" + f.name.replace("_", "-"), **kwargs)

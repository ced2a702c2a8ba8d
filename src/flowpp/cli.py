"""The ``flowpp`` command line: parsing and dispatch only; :mod:`flowpp.jobs` does the work.

Errors a user can cause (:class:`flowpp.errors.FlowppError`, and file-system errors such as a
full disk) print one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys

from .cli_values import (
    DATASETS_HELP,
    Formatter,
    add_settings,
    option_groups,
    parse_override,
    positive_int,
    thread_count,
)

__all__ = ["main", "build_parser"]


def _add_train(sub, parents) -> None:
    from . import list_configs
    from .training import TrainSettings

    t = sub.add_parser(
        "train",
        formatter_class=Formatter,
        help="train a model into a run directory",
        parents=[parents["data"], parents["runtime"], parents["seed"]],
        description="Train a Flow++ model. Writes config.json, settings.json, metrics.csv, "
        "checkpoints/, samples/ and summary.json into --out.",
    )
    g = t.add_argument_group("model and data")
    g.add_argument(
        "--config",
        default=None,
        help=f"named config: {', '.join(list_configs())} (with --resume: taken from the run when omitted)",
    )
    g.add_argument(
        "--data",
        default=None,
        help=f"DATASET: {DATASETS_HELP} (default: the config's name when it is a dataset; with --resume, the run's)",
    )
    g.add_argument(
        "--valid-split",
        default=None,
        choices=["valid", "test"],
        help="split used for validation during training; 'test' trains on train and valid together "
        "(for CIFAR-10 all 50,000 images) and validates on the test set, as the paper did "
        "(default: valid; with --resume, the run's)",
    )
    g.add_argument(
        "--bits",
        type=int,
        default=None,
        choices=range(1, 9),
        metavar="N",
        help="reduce 8-bit data to N bits (x >> (8 - N)) and model 2^N levels (default: the config's "
        "levels; 8-bit data is reduced automatically for an n-bit config)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=parse_override,
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set filters=64 --set dropout=0.1 (repeatable)",
    )
    optimisation = t.add_argument_group("optimisation")
    optimisation.add_argument("--batch-size", type=positive_int, default=None,
                              help="global batch (default: the config's)")  # fmt: skip
    optimisation.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    output = t.add_argument_group("evaluation, checkpoints and output")
    output.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    output.add_argument("--dry-run", action="store_true", help="print the resolved config and settings, then exit")
    output.add_argument(
        "--procs",
        type=thread_count,
        default=1,
        help="CPU training processes (DDP on gloo, started by flowpp; each with --threads threads, default 1). "
        "auto: one more than the cores (docs/performance.md: next to a busy process they keep their speed "
        "whatever the threads' scaling, at some cost on an idle machine); never more than 1 on a GPU or under "
        "torchrun",
    )
    add_settings(TrainSettings, {optimisation.title: optimisation, output.title: output})


def build_parser() -> argparse.ArgumentParser:
    parents = option_groups()
    p = argparse.ArgumentParser(
        prog="flowpp",
        formatter_class=Formatter,
        description="Flow++ normalizing flows: train, evaluate, sample, score and compress.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (
        _add_train, _add_eval, _add_prepare, _add_sample, _add_score,
        _add_compress, _add_decompress, _add_export, _add_import, _add_configs,
    ):  # fmt: skip
        add(sub, parents)
    return p


def _add_eval(sub, parents) -> None:
    e = sub.add_parser(
        "eval",
        formatter_class=Formatter,
        help="bits/dim of a run on a dataset split",
        parents=[parents["data"], parents["runtime"], parents["seed"], parents["compile"], parents["which"]],
        description="Evaluate the EMA weights of a run's newest checkpoint. With --samples S > 1 "
        "also the importance-weighted bound (float64 log-mean-exp over S "
        "dequantization samples per image). The paper's protocol: --split test "
        "--samples 4096.",
    )
    e.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="run directory, or a .safetensors file from `flowpp export` (under torchrun write --run-dir: "
        "torchrun reads --run as an abbreviation of its own --run-path)",
    )
    e.add_argument("--data", required=True, help=f"DATASET: {DATASETS_HELP}")
    e.add_argument("--split", default="test", choices=["train", "valid", "test"], help="which split")
    e.add_argument("--samples", type=positive_int, default=1, help="dequantization samples per image (S)")
    e.add_argument("--batch-size", type=positive_int, default=64, help="rows per pass (images x samples)")
    e.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    e.add_argument("--out", default=None, help="JSON file (default: RUN/eval-<data>-<split>-S<S>.json)")
    e.add_argument(
        "--chunk",
        type=positive_int,
        default=None,
        metavar="N",
        help="images per saved part of the per-image results (default: about a million images x samples, "
        "64 to 4096 images)",
    )
    e.add_argument(
        "--restart",
        action="store_true",
        help="discard the per-image results a previous, interrupted run of this evaluation saved "
        "(by default it continues from them)",
    )
    e.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress reports (by default a bar on a terminal, else a line every tenth of the images)",
    )


def _add_prepare(sub, parents) -> None:
    pr = sub.add_parser(
        "prepare",
        formatter_class=Formatter,
        help="decode a dataset once into memory-mapped arrays",
        parents=[parents["data"]],
        description="Decode a dataset into DATA_DIR/prepared/<name>/ (uint8 arrays and a manifest) that "
        "train and eval memory-map. Named datasets are prepared on first use anyway; this does it ahead "
        "of time, checks a preparation, or rebuilds it.",
    )
    pr.add_argument("--data", required=True, help=f"DATASET: {DATASETS_HELP}")
    pr.add_argument("--bits", type=int, choices=range(1, 9), metavar="N", default=None,
                    help="prepare the data reduced to N bits (as an n-bit config uses it)")  # fmt: skip
    pr.add_argument("--force", action="store_true", help="rebuild even when the preparation is current")
    pr.add_argument("--verify", action="store_true",
                    help="check every byte of the preparation and of its sources against the manifest's "
                         "digests; rebuild when they differ")  # fmt: skip


def _add_sample(sub, parents) -> None:
    s = sub.add_parser(
        "sample",
        formatter_class=Formatter,
        help="draw samples from a run",
        parents=[parents["runtime"], parents["seed"], parents["compile"], parents["which"]],
        description="Sample z ~ N(0, T^2 I) and invert the main flow with the EMA weights.",
    )
    s.add_argument("--run", required=True, help="run directory, or a .safetensors file from `flowpp export`")
    s.add_argument("-n", "--num", type=positive_int, default=64, help="number of samples")
    s.add_argument("--temperature", type=float, default=1.0, help="prior temperature T")
    s.add_argument("--out", default="samples.png", help="PNG grid to write")
    s.add_argument("--npz", default=None, help="also save the integer samples (N, H, W, C) uint8 as 'x' in this .npz")
    s.add_argument("--scale", type=positive_int, default=1, help="enlarge the grid by this integer factor")
    s.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch")


def _add_score(sub, parents) -> None:
    c = sub.add_parser(
        "score",
        formatter_class=Formatter,
        help="bits/dim of given image files",
        parents=[parents["runtime"], parents["seed"], parents["compile"], parents["which"]],
        description="Bits/dim of each PNG/JPEG image, or each image in an .npz, under a run's "
        "model (e.g. for out-of-distribution detection). 8-bit pixels are mapped to "
        "the config's levels.",
    )
    c.add_argument("--run", required=True, help="run directory, or a .safetensors file from `flowpp export`")
    c.add_argument("images", nargs="+", help="PNG/JPEG files or .npz files")
    c.add_argument("--samples", type=positive_int, default=16, help="dequantization samples per image")
    c.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of a table")


def _add_compress(sub, parents) -> None:
    c = sub.add_parser(
        "compress",
        formatter_class=Formatter,
        help="compress images losslessly into one archive with a model",
        parents=[parents["data"], parents["runtime"], parents["which"]],
        description="Bits-back coding with the model (docs/compression.md): PNG files, an .npz with key 'x' "
        "(uint8 N,H,W,C) or a dataset split become one archive, about the model's bits/dim in size. "
        "Decompressing needs the same model, flowpp and torch versions, and the same kind of machine.",
    )
    c.set_defaults(device="cpu")  # the coder runs on the CPU
    c.add_argument("--run", required=True, help="run directory, or a .safetensors file from `flowpp export`")
    c.add_argument("images", nargs="*", help="PNG files, or one .npz file with key 'x'")
    c.add_argument("--data", default=None, help=f"DATASET instead of files: {DATASETS_HELP}")
    c.add_argument("--split", default="test", choices=["train", "valid", "test"], help="with --data: which split")
    c.add_argument("--limit", type=positive_int, default=None, help="with --data: only the first N images")
    c.add_argument("--out", required=True, help="archive file to write")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument(
        "--grid-bits",
        type=int,
        default=18,
        help="the flow's values are coded on a grid of 2^-N (8..24; docs/compression.md)",
    )
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")


def _add_decompress(sub, parents) -> None:
    d = sub.add_parser(
        "decompress",
        formatter_class=Formatter,
        help="restore the images of an archive exactly",
        parents=[parents["which"]],
        description="Decode an archive from `flowpp compress` with the same model. PNG inputs come back as "
        "PNG files with their names, arrays as OUT/images.npz (key 'x'). Nothing is written unless every "
        "image decodes exactly.",
    )
    d.add_argument("archive", help="archive file")
    d.add_argument("--run", required=True, help="the run directory or exported file that compressed it")
    d.add_argument("--out", required=True, help="folder to write the images into")
    d.add_argument("--device", default="cpu", help="cpu: the coder runs on the CPU")
    d.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")


def _add_export(sub, parents) -> None:
    x = sub.add_parser(
        "export",
        formatter_class=Formatter,
        help="export a run's weights to safetensors or to the Flow++ release format",
        parents=[parents["which"]],
        description="Write the EMA weights of a run's best model (or newest checkpoint) as safetensors, with the "
        "config as metadata, and a model card (<out>.card.json) beside it: config, parameters, data, steps and "
        "what was measured. flowpp.load(file) reads it back; eval, sample and score take it as --run.\n\n"
        "With an .npz --out (or --format release) the weights are written in the format of the Flow++ release "
        "instead: one float32 array per variable of the official TensorFlow graph, under its name and in its "
        "layout, for the official code and the local bits-back coding code (configs built like the official "
        "CIFAR-10 or ImageNet models only). --run may then also be an exported .safetensors file.",
    )
    x.add_argument("--run", required=True, help="run directory (or, for the release format, an exported file)")
    x.add_argument("--out", required=True, help=".safetensors file (or .npz for the release format) to write")
    x.add_argument("--raw", action="store_true", help="the raw (trained) weights instead of their EMA")
    x.add_argument("--format", default="auto", choices=["auto", "flowpp", "release"],
                   help="flowpp: safetensors and a model card; release: the Flow++ release's .npz; "
                        "auto: release when --out ends in .npz")  # fmt: skip


def _add_import(sub, parents) -> None:
    m = sub.add_parser(
        "import",
        formatter_class=Formatter,
        help="import a Flow++ release weight file (the authors' trained models)",
        description="Read a weight file of the Flow++ release (flowpp_cifar_model.npz, "
        "flowpp_imagenet32_model.npz, flowpp_imagenet64_model.npz: the variables of the authors' TensorFlow "
        "graph) for a named config and write it as a flowpp export (safetensors and a model card naming the "
        "source file and its SHA-256). Every variable must fit the config exactly. Exponential-moving-average "
        "shadows in the file are used in place of the raw variables; Adam slots are ignored. The file is "
        "never unpickled.",
    )
    m.add_argument("file", help="the release's .npz weight file")
    m.add_argument("--config", required=True,
                   help="the architecture: cifar10, imagenet32, imagenet64 or an n-bit config of the ImageNet "
                        "code (imagenet64-5bit, celeba64-5bit, celeba64-3bit, celeba128-5bit)")  # fmt: skip
    m.add_argument("--out", required=True, help=".safetensors file to write (the card goes beside it)")
    m.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                   metavar="KEY=VALUE", help="override a config field, as for train (repeatable)")  # fmt: skip


def _add_configs(sub, parents) -> None:
    k = sub.add_parser("configs", formatter_class=Formatter, help="list the named configs with parameter counts")
    k.add_argument("name", nargs="?", default=None, help="show one config in full")


def _train(args) -> int:
    from . import jobs
    from .training import TrainSettings

    config = jobs.resolve_train_config(
        args.config,
        out=args.out_dir,
        resume=args.resume,
        overrides=args.overrides,
        batch_size=args.batch_size,
        lr=args.lr,
        bits=args.bits,
    )
    settings = TrainSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings) if hasattr(args, f.name)}
    )
    from .distributed import auto_processes

    procs = auto_processes(args.device, config.batch_size) if args.procs == "auto" else args.procs
    if settings.threads is None:  # a busy machine must not stall training: adapt unless told
        settings = dataclasses.replace(settings, threads=1 if procs > 1 else "auto")
    jobs.train_job(
        config,
        settings,
        data=args.data,
        data_dir=args.data_dir,
        download=args.download,
        resume=args.resume,
        dry_run=args.dry_run,
        prepared=args.prepared,
        processes=procs,
        argv=args.argv,
    )
    return 0


def _call(job_name: str, args) -> int:
    """Call a job of flowpp.jobs with the parsed options it takes (by name)."""
    import inspect

    from . import jobs

    job = getattr(jobs, job_name)
    job(**{name: getattr(args, name) for name in inspect.signature(job).parameters if hasattr(args, name)})
    return 0


COMMANDS = {
    "train": _train,
    "eval": lambda a: _call("eval_job", a),
    "sample": lambda a: _call("sample_job", a),
    "score": lambda a: _call("score_job", a),
    "compress": lambda a: _call("compress_job", a),
    "decompress": lambda a: _call("decompress_job", a),
    "export": lambda a: _call("export_job", a),
    "import": lambda a: _call("import_job", a),
    "prepare": lambda a: _call("prepare_job", a),
    "configs": lambda a: _call("configs_job", a),
}


def _stdout_to_devnull() -> None:
    """Point the standard output at /dev/null, so that the interpreter's last flush of what was
    still buffered for a closed pipe does not fail again at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # not a real file (a test's capture): nothing will flush into a closed pipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what processes started by `train` run
    from .distributed import set_threads
    from .errors import FlowppError

    set_threads(getattr(args, "threads", None))
    try:
        return COMMANDS[args.command](args)
    except FlowppError as e:
        print(f"flowpp: error: {e}", file=sys.stderr)
    except BrokenPipeError:  # the reader went away (`flowpp configs | head`): nothing went wrong here
        _stdout_to_devnull()
        return 0
    except OSError as e:  # the file system refused: a full disk, a path that cannot be written
        print(f"flowpp: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
    except KeyboardInterrupt:
        print("flowpp: error: interrupted", file=sys.stderr)
    return 2

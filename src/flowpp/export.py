"""Exported weights: a safetensors file (no pickle at all) with the config as metadata, a model
card beside it, and :func:`load` to read such a file back into a ready model."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch

from .atomic import atomic_write_bytes, write_json
from .configs import FlowConfig, get_config
from .export_file import EXPORT_VERSION, card_path, load_export, safetensors_module
from .model import FlowPlusPlus, count_parameters
from .runs import RunDir

__all__ = [
    "export_safetensors",
    "save_export",
    "import_release_file",
    "export_release_file",
    "load",
    "load_with_metadata",
    "card_path",
    "EXPORT_VERSION",
]


def _measurements(run: RunDir, summary: dict, settings: dict) -> list[dict]:
    """What was measured of this run: its `flowpp eval` results, else the validation during training."""
    found = []
    for f in sorted(glob.glob(str(run.path / "eval-*.json"))):
        try:
            r = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue
        entry = {k: r.get(k) for k in ("data", "split", "n_images", "samples", "bpd", "bpd_se", "iw_bpd", "iw_bpd_se",
                                       "step", "checkpoint")}  # fmt: skip
        found.append({k: v for k, v in entry.items() if v is not None})
    if not found and summary.get("best_valid_bpd") is not None:
        found.append(dict(split=settings.get("valid_split", "valid"), n_images=settings.get("eval_images"), samples=1,
                          bpd=summary["best_valid_bpd"], step=summary.get("best_step"),
                          note="validation during training (EMA, single-sample bound)"))  # fmt: skip
    return found


def save_export(model: FlowPlusPlus, out: str | Path, metadata: dict[str, str], card: dict) -> tuple[Path, int]:
    """Write ``model``'s state as safetensors (config and ``metadata`` in its header) and ``card``
    as ``<name>.card.json`` beside it; returns (path, tensor count)."""
    st = safetensors_module()
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": "flowpp",
        "flowpp_export_version": EXPORT_VERSION,
        "config": json.dumps(model.config.to_dict()),
        **metadata,
    }
    path = atomic_write_bytes(out, st.save(tensors, metadata=meta))
    write_json(card_path(path), dict(weights_file=path.name, config=model.config.to_dict(),
                                     parameters=count_parameters(model.config), **card))  # fmt: skip
    return path, len(tensors)


def export_safetensors(
    run_dir: str | Path, out: str | Path, weights: str = "ema", which: str | None = None
) -> tuple[Path, int, dict]:
    """Write the run's best (or last) weights to ``out`` and a model card beside it."""
    run = RunDir(run_dir)
    model, info = run.load_model("cpu", weights=weights, which=which)
    summary = json.loads(run.summary_file.read_text()) if run.summary_file.is_file() else {}
    settings = run.read_settings()
    card = dict(
        dataset=settings.get("dataset"), dataset_description=settings.get("dataset_description"),
        steps=info["step"], which=info["which"], weights=weights, trained_steps=summary.get("steps"),
        images_seen=summary.get("images_seen"), measured=_measurements(run, summary, settings),
    )  # fmt: skip
    path, n = save_export(model, out, {"weights": weights, "which": info["which"], "step": str(info["step"])}, card)
    return path, n, json.loads(card_path(path).read_text())


def import_release_file(
    source: str | os.PathLike, config: FlowConfig, out: str | Path
) -> tuple[Path, int, dict, FlowPlusPlus]:
    """Read a Flow++ release weight file (:mod:`flowpp.release`) for ``config`` and write it as
    a flowpp export whose card says where the weights came from."""
    from .release import RELEASE_REPORTED, import_release

    model, info = import_release(source, config)
    official = RELEASE_REPORTED.get(config.name)
    reported = []
    if official is not None and info["parameters"] == count_parameters(get_config(config.name)):
        note = "reported by the compression paper (Ho, Lohn, Abbeel 2019) for the released model: the single-sample "
        reported.append(dict(official, note=note + "bound; not measured by flowpp"))
    card = dict(
        trained_by="not flowpp: the weights were imported from a Flow++ release weight file (variables of the "
        "authors' TensorFlow graph); flowpp did not train them",
        source=dict(file=info["source"], sha256=info["sha256"], format="Flow++ release (.npz of TensorFlow variables)",
                    variables=info["variables"], ema_shadows_used=info["ema"],
                    ignored_optimizer_variables=len(info["ignored"])),
        weights="ema" if info["ema"] else "as stored in the file",
        measured=[], reported=reported,
    )  # fmt: skip
    meta = {"weights": card["weights"], "which": f"imported from {info['source']}", "step": "",
            "source_sha256": info["sha256"]}  # fmt: skip
    path, n = save_export(model, out, meta, card)
    return path, n, dict(card, **{"weights_file": path.name}), model


def export_release_file(model_source: str | Path, out: str | Path, weights: str = "ema", which: str | None = None):
    """Write the model of a run directory (or of an exported file) in the release format."""
    from .release import write_release

    if Path(model_source).is_file():
        model, meta = load_with_metadata(model_source)
        info = {"which": f"exported ({meta.get('which', '?')})", "step": meta.get("step")}
    else:
        model, info = RunDir(model_source).load_model("cpu", weights=weights, which=which)
    path, n = write_release(model, out)
    return path, n, info


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> FlowPlusPlus:
    """The model of an exported ``.safetensors`` file (config from its metadata), in eval mode."""
    return load_with_metadata(path, device)[0]


def load_with_metadata(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[FlowPlusPlus, dict]:
    """:func:`load`, and the file's metadata (step, which weights, ...)."""
    return load_export(path, device, FlowPlusPlus)

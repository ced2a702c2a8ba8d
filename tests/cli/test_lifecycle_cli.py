"""A trained model's life after training: the best model, early stopping, export, model card, load."""

import json

import pytest
import torch

import flowpp
from flowpp.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from flowpp.cli import main
from flowpp.runs import RunDir

TRAIN = ["train", "--config", "tiny", "--no-progress", "--eval-images", "16", "--log-every", "1", "--threads", "1"]


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="session")  # once per (xdist) process, even when its tests are spread out
def trained(tmp_path_factory, tiny_npz):
    out = tmp_path_factory.mktemp("life") / "run"
    args = ("--max-steps", 8, "--eval-every", 2, "--checkpoint-every", 1, "--keep-checkpoints", 1, "--lr", "0.005")
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, *args) == 0
    return out


def test_the_best_model_is_kept_outside_the_rotation(trained):
    summary = json.loads((trained / "summary.json").read_text())
    rows = [r.split(",") for r in (trained / "metrics.csv").read_text().splitlines()[1:]]
    valid = {int(r[0]): float(r[3]) for r in rows if r[3]}
    best_step = min(valid, key=valid.get)
    assert summary["best_step"] == best_step and summary["best_valid_bpd"] == pytest.approx(valid[best_step])
    assert summary["best_checkpoint"].endswith("best.pt") and (trained / "best.pt.sha256").is_file()
    assert [p.name for p in list_checkpoints(trained / "checkpoints")] == ["checkpoint-00000008.pt"]
    best = RunDir(trained).load_model(which="best")[1]
    assert best["step"] == best_step and best["which"] == "best"


def test_commands_use_the_best_model_unless_told_otherwise(trained, tiny_npz, tmp_path, capsys):
    for which, extra in (("best", []), ("best", ["--weights", "best"]), ("last", ["--weights", "last"])):
        out = tmp_path / f"{which}{len(extra)}.json"
        assert run("eval", "--run", trained, "--data", tiny_npz, "--limit", 4, "--out", out, *extra) == 0
        assert f"weights: {which}" in capsys.readouterr().err
        res = json.loads(out.read_text())
        assert res["weights"] == which and res["checkpoint"].endswith("best.pt" if which == "best" else ".pt")


def test_patience_stops_a_run_that_no_longer_improves(tmp_path, tiny_npz):
    out = tmp_path / "flat"
    # A learning rate of 0 never improves on the first evaluation: evaluations at steps 2, 4 and 6.
    assert run(*TRAIN, "--data", tiny_npz, "--out", out, "--max-steps", 50, "--eval-every", 2, "--patience", 2,
               "--lr", 0) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "patience" and summary["steps"] == 6 and summary["best_step"] == 2


def test_export_then_load_gives_the_same_model(trained, tiny_npz, tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    assert run("export", "--run", trained, "--out", path) == 0
    loaded = flowpp.load(path)
    assert not loaded.training and isinstance(flowpp.FlowPlusPlus.from_pretrained(path), flowpp.FlowPlusPlus)
    reference, info = RunDir(trained).load_model(which="best")
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.log_prob(x, noise=noise), reference.log_prob(x, noise=noise))
    assert torch.equal(loaded.encode(x + 0.5), reference.encode(x + 0.5))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(loaded.sample(3, generator=g1), reference.sample(3, generator=g2))
    card = json.loads((tmp_path / "tiny.card.json").read_text())
    assert card["parameters"] == flowpp.count_parameters(flowpp.get_config("tiny"))
    assert card["steps"] == info["step"] and card["which"] == "best" and card["dataset"] == str(tiny_npz)
    assert card["measured"] and all("bpd" in m and "n_images" in m for m in card["measured"])
    # eval, sample and score take the exported file in place of a run directory
    capsys.readouterr()
    assert run("sample", "--run", path, "-n", 2, "--out", tmp_path / "s.png") == 0
    assert run("eval", "--run", path, "--data", tiny_npz, "--limit", 4) == 0
    assert (tmp_path / "tiny.eval-tiny-test-S1.json").is_file()
    assert run("eval", "--run", path, "--data", tiny_npz, "--weights", "last") == 2
    assert "exported file" in capsys.readouterr().err


def test_loading_refuses_what_is_not_an_intact_export(trained, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    good = tmp_path / "good.safetensors"
    assert run("export", "--run", trained, "--out", good) == 0
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "png.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with st.safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = dict(meta, config=json.dumps(dict(json.loads(meta["config"]), filters=16)))
    (tmp_path / "other.safetensors").write_bytes(st.save(tensors, metadata=other))
    (tmp_path / "future.safetensors").write_bytes(st.save(tensors, metadata=dict(meta, flowpp_export_version="9")))
    (tmp_path / "bare.safetensors").write_bytes(st.save(tensors))
    for name, message in (("cut", "not a readable safetensors"), ("png", "not a readable safetensors"),
                          ("other", "does not fit config"), ("future", "layout version 9"),
                          ("bare", "no flowpp metadata"), ("missing", "does not exist")):  # fmt: skip
        with pytest.raises(CheckpointError, match=message):
            flowpp.load(tmp_path / f"{name}.safetensors")


def test_the_library_loads_a_run_in_the_words_of_the_command_line(trained):
    from flowpp.runs import load_run

    best, info = load_run(trained, weights="best")
    assert info["weights"] == "best" and info["raw"] is False and info["checkpoint"].endswith("best.pt")
    last, info = load_run(trained, weights="last", raw=True)
    assert info == {"weights": "last", "raw": True, "checkpoint": info["checkpoint"], "step": 8}
    assert info["checkpoint"].endswith("checkpoint-00000008.pt")
    raw_state = load_checkpoint(list_checkpoints(trained / "checkpoints")[-1])["model"]
    assert all(torch.equal(v, raw_state[k]) for k, v in last.state_dict().items())
    with pytest.warns(DeprecationWarning, match="raw=True"):  # the earlier words still work
        model, info = load_run(trained, weights="model", which="last")
    assert info["raw"] is True and info["weights"] == "last"
    assert all(torch.equal(v, raw_state[k]) for k, v in model.state_dict().items())

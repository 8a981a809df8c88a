"""Integrity of a run directory: stages rerun exactly when what they read changed, per-fold records keyed by what
produced them, self-contained (movable) runs, recoverable failed fits, one writer per run, checksummed outputs,
and checkpoints/TabNet models loaded without unpickling code (issues #12 part 4 and #16)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import compose_fast, finished_run

ROOT = Path(__file__).resolve().parent.parent
#: The smallest full pipeline: one neural module, no TabNet, no pseudo-labelling rounds.
SMALL = ("model.prompt_prototype.enabled=false", "model.co_attention.enabled=false", "features.sentence_model=''",
         "stacking.members.tabnet.enabled=false", "stacking.pseudo_rounds=0",
         "features.image_stats=false")  # with it on, the features read the images too (and an image edit reruns them)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "integrity", *SMALL)


def _stage_log(caplog) -> dict[str, str]:
    """stage -> "running" / "skipped", from the pipeline log of one train() call."""
    out = {}
    for rec in caplog.records:
        msg = rec.getMessage()
        if msg.startswith("[") and "]" in msg:
            stage, rest = msg[1:].split("]", 1)
            if rest.strip().startswith(("running", "skipped")):
                out[stage] = rest.strip().split(":")[0].split()[0]
    return out


def _rerun(tmp_path, run_dir: Path, data_root: Path, caplog, *overrides: str) -> dict[str, str]:
    from popstack import train

    cfg = compose_fast(tmp_path, *SMALL, f"data.root={data_root}", f"hydra.run.dir={run_dir}", *overrides)
    caplog.clear()
    with caplog.at_level("INFO", logger="popstack"):
        train(cfg)
    return _stage_log(caplog)


# ------------------------------------------------------------------ 1, 7: stage hashes cover inputs and outputs
@pytest.mark.slow
def test_raw_edits_rerun_exactly_the_downstream_stages(small_run, tmp_path, caplog):
    run_src, data_src = small_run
    run_dir, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(run_src, run_dir)
    shutil.copytree(data_src, data)
    # a copy of the run and of the data (elsewhere) is still the same run: nothing reruns
    assert set(_rerun(tmp_path, run_dir, data, caplog).values()) == {"skipped"}

    # one image changes: the shards (prepare) and everything reading them rerun; the features do not
    posts = pd.read_parquet(run_dir / "posts.parquet")
    from PIL import Image

    first = data / posts.loc[posts.image_status == "ok", "image_relpath"].iloc[0]
    Image.new("RGB", (64, 48), (250, 10, 10)).save(first, format="JPEG")
    ran = _rerun(tmp_path, run_dir, data, caplog)
    assert ran == {"prepare": "running", "features": "skipped", "neural": "running", "extract": "running",
                   "stack": "running", "report": "running"}, ran

    # one label changes: the features (target statistics) rerun too
    labels = data / "train_allmetadata_json" / "train_label.txt"
    lines = labels.read_text().splitlines()
    lines[3] = f"{float(lines[3]) + 2.5:.2f}"
    labels.write_text("\n".join(lines) + "\n")
    ran = _rerun(tmp_path, run_dir, data, caplog)
    assert ran["prepare"] == ran["features"] == "running", ran

    # an output truncated behind the pipeline's back: its stage reruns instead of being used
    tab = run_dir / "features" / "tabular.parquet"
    tab.write_bytes(tab.read_bytes()[:100])
    ran = _rerun(tmp_path, run_dir, data, caplog)
    assert ran["prepare"] == "skipped" and ran["features"] == "running", ran
    pd.read_parquet(tab)
    # a subset that would leave finished stages reading prepare out of date is refused (issue #27)
    labels.write_text(labels.read_text().replace("\n", "1\n", 1))
    from popstack.pipeline.errors import UserError

    with pytest.raises(UserError, match="would rerun"):
        _rerun(tmp_path, run_dir, data, caplog, "stages=[prepare,features]")


def test_stage_runner_checks_every_output(tmp_path):
    from popstack.pipeline.manifest import StageResult, StageRunner

    calls = []

    def stage():
        calls.append(1)
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / "a.bin").write_bytes(b"x" * 1000)
        (tmp_path / "f.txt").write_text("hello")
        return StageResult(outputs=["d", "f.txt"])

    def run():
        runner = StageRunner(tmp_path, log=lambda m: None)
        runner.run("s", {"k": 1}, stage)

    run()
    run()
    assert len(calls) == 1
    (tmp_path / "f.txt").write_text("HELLO")  # same size, new content and mtime
    run()
    assert len(calls) == 2
    (tmp_path / "d" / "extra").write_text("")  # a directory gained a file
    run()
    assert len(calls) == 3
    stat = (tmp_path / "f.txt").stat()
    os.utime(tmp_path / "f.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    run()
    assert len(calls) == 3


# ------------------------------------------------------------------ 2: per-fold records keyed by what made them
@pytest.mark.slow
def test_new_folds_retrain_instead_of_reusing_models(small_run, tmp_path, caplog):
    run_src, data = small_run
    run_dir = tmp_path / "run"
    shutil.copytree(run_src, run_dir)
    fold_dir = run_dir / "neural" / "hierarchical" / "fold0"
    best_before = (fold_dir / "checkpoints" / "best.ckpt").read_bytes()
    before = json.loads((fold_dir / "key.json").read_text()) if (fold_dir / "key.json").is_file() else {}
    for later in ("extract", "stack", "report"):  # a subset may not leave finished later stages out of date
        (run_dir / "manifests" / f"{later}.json").unlink()
    # random folds: a new seed deals new folds (time blocks do not depend on the seed)
    ran = _rerun(tmp_path, run_dir, data, caplog, "seed=7", "folds.strategy=random", "stages=[prepare,features,neural]")
    assert ran["neural"] == "running"
    assert sum("neural: training hierarchical fold" in r.getMessage() for r in caplog.records) == 2
    assert (fold_dir / "checkpoints" / "best.ckpt").read_bytes() != best_before
    after = json.loads((fold_dir / "key.json").read_text())
    assert after["folds"] != before.get("folds") and after["backbone"] != before.get("backbone")


# ------------------------------------------------------------------ 3: self-contained run directory
def _different_run(src: Path, dst: Path) -> None:
    """A valid run at ``dst`` that predicts differently from ``src``: folds' checkpoints swapped, backbone scaled."""
    shutil.copytree(src, dst)
    a, b = (dst / "neural" / "hierarchical" / f"fold{k}" / "checkpoints" / "best.ckpt" for k in (0, 1))
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    state = torch.load(dst / "embeddings" / "backbone.pt", weights_only=True)
    torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()},
               dst / "embeddings" / "backbone.pt")


@pytest.mark.slow
def test_copied_run_predicts_with_its_own_files(small_run, tmp_path):
    from popstack.commands.predict import predict

    run_src, data = small_run
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(run_src, original)
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    _different_run(run_src, original)  # another run where the copy's files used to be
    result = predict(copy, data, tmp_path / "out.parquet", work_dir=tmp_path)
    trained = pd.read_parquet(run_src / "predictions.parquet").set_index("post_id")
    test = trained[trained.split == "test"]
    got = result.set_index("post_id").loc[test.index, "popularity_score"].to_numpy()
    np.testing.assert_allclose(got, test.prediction.to_numpy(), rtol=1e-4, atol=1e-4)
    assert (copy / "config.yaml").read_text().count("run_dir: .") == 1
    for path in run_src.rglob("*"):  # no file of a run names the run's own location
        assert not path.is_file() or str(run_src).encode() not in path.read_bytes(), path


# ------------------------------------------------------------------ 4, 8: fits that fail or load unsafe files
def _tiny_fit(out: Path, epochs: int, key: dict | None = None):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from popstack.pipeline.training import fit_resumable

    class Reg(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val/loss", torch.nn.functional.mse_loss(self.lin(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            return DataLoader(TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)),
                              batch_size=8)

        val_dataloader = train_dataloader

    trainer_cfg = {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
                   "deterministic": True, "log_every_n_steps": 1}
    return fit_resumable(Reg(), DM(), out, key=key or {"k": 1}, trainer_cfg=trainer_cfg, max_epochs=epochs,
                         monitor="val/loss", mode="min", seed=0, progress_bar=False)


def test_zero_epochs_or_missing_checkpoint_never_leaves_a_dead_end(tmp_path):
    from popstack.pipeline.errors import UserError

    out = tmp_path / "fold0"
    with pytest.raises(UserError, match="epochs must be at least 1"):
        _tiny_fit(out, 0)
    assert not (out / "done.json").exists()
    best = _tiny_fit(out, 1)
    done = json.loads((out / "done.json").read_text())
    assert done["best"] == "checkpoints/best.ckpt" and best == out / "checkpoints" / "best.ckpt"
    best.unlink()  # done.json now points at nothing: the next call trains again instead of returning it
    again = _tiny_fit(out, 1)
    assert again.is_file()


class _Plant:
    """Unpickling this object creates ``path`` (proof that code ran)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_planted_pickles_never_run(tmp_path, monkeypatch):
    from popstack.pipeline.errors import UserError
    from popstack.pipeline.neural import load_module
    from popstack.pipeline.training import start_fresh_unless
    from popstack.stacking.members.tabnet import TabNetMember

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code-ran"
    # Lightning's resume from last.ckpt
    out = tmp_path / "fold0"
    start_fresh_unless(out, {"k": 1})
    (out / "checkpoints").mkdir()
    torch.save({"state_dict": _Plant(marker)}, out / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match="last.ckpt is not a plain tensor checkpoint"):
        _tiny_fit(out, 1)
    assert not marker.exists()
    # a module checkpoint at inference
    torch.save({"state_dict": _Plant(marker)}, tmp_path / "best.ckpt")
    with pytest.raises(UserError, match="best.ckpt"):
        load_module("hierarchical", tmp_path / "best.ckpt")
    assert not marker.exists()
    # a TabNet member file (the old zip layout, with a pickle as its network)
    path = tmp_path / "tabnet.fold0.safetensors"
    buf = io.BytesIO()
    torch.save(_Plant(marker), buf)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model_params.json", json.dumps({"init_params": {}, "class_attrs": {}}))
        z.writestr("network.pt", buf.getvalue())
    Path(f"{path}.json").write_text(json.dumps({"offset": 0.0, "init_params": {"input_dim": 3, "output_dim": 1},
                                                "feature_importances": [0.3, 0.3, 0.4]}))
    from popstack.features.preprocess import Standardiser

    Standardiser.fit(pd.DataFrame(np.ones((4, 3)), columns=list("abc"))).save(f"{path}.scaler.npz")
    with pytest.raises(ValueError, match="tabnet.fold0.safetensors"):
        TabNetMember.load(path)
    assert not marker.exists()


def test_tabnet_member_round_trip_without_pickle(tmp_path):
    from popstack.stacking.members.tabnet import TabNetMember

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(96, 4)).astype(np.float32), columns=list("abcd"))
    y = X.a.to_numpy() * 2 + 6
    member = TabNetMember({"max_epochs": 1, "batch_size": 64, "virtual_batch_size": 32, "n_d": 4, "n_a": 4,
                           "n_steps": 1}, [], 0).fit(X[:64], y[:64], X[64:], y[64:])
    path = tmp_path / "tabnet.fold0.safetensors"
    member.save(path)
    with open(path, "rb") as f:
        assert not f.read(2) == b"PK"  # not a zip of pickles
    loaded = TabNetMember.load(path)
    np.testing.assert_allclose(loaded.predict(X), member.predict(X), rtol=1e-6)
    assert loaded.feature_importance().index.tolist() == list("abcd")


# ------------------------------------------------------------------ 5: one writer per run directory
def test_second_train_on_a_locked_run_dir_fails_with_the_holder(tmp_path, monkeypatch, capsys):
    from popstack.commands.train import main, train
    from popstack.pipeline.lock import RunLock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from popstack.pipeline.lock import RunLock; "
         f"RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["debug=fast", f"paths.root_dir={tmp_path}", f"hydra.run.dir={run_dir}"]) == 2
        stderr = capsys.readouterr().err
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"pid {holder.pid} on " in errors[0] and "started" in errors[0], stderr
        assert not (run_dir / "config.yaml").exists()  # the second process wrote nothing
        # a DDP child of the holder's run is not blocked
        monkeypatch.setenv("LOCAL_RANK", "1")
        train(compose_fast(tmp_path, f"hydra.run.dir={run_dir}", "stages=[]"))
        monkeypatch.delenv("LOCAL_RANK")
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file stays, and is stale
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
    with RunLock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    with RunLock(run_dir):  # released on exit: taken again at once
        pass

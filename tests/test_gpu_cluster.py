"""What the first run on a GPU node or a cluster needs, shown on CPU: prediction placement on a machine without
CUDA, the run lock where ``flock`` is missing, stale rank files, CatBoost's GPU fits from concurrent threads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from popstack.pipeline.errors import UserError

GPU_TRAINER = {"accelerator": "gpu", "devices": 8, "num_nodes": 2, "strategy": "ddp", "precision": "bf16-mixed"}


def test_gpu_run_placement_without_cuda(monkeypatch, caplog):
    from popstack.pipeline.inference import CPU_PLACEMENT, placement_for_this_machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = OmegaConf.create(GPU_TRAINER)
    caplog.set_level("WARNING", logger="popstack")
    assert placement_for_this_machine(trainer, None, None, None) == CPU_PLACEMENT
    assert len([r for r in caplog.records if "no CUDA" in r.getMessage()]) == 1
    caplog.clear()
    assert placement_for_this_machine(trainer, "cpu", 2, "bf16-mixed") == {**CPU_PLACEMENT, "devices": 2,
                                                                          "precision": "bf16-mixed"}
    assert not caplog.records  # asked for the CPU: nothing to warn about
    with pytest.raises(UserError, match="no CUDA"):
        placement_for_this_machine(trainer, "gpu", None, None)
    with pytest.raises(UserError, match="accelerator must be one of"):
        placement_for_this_machine(trainer, "gpus", None, None)


def test_gpu_run_placement_with_cuda_keeps_the_run(monkeypatch):
    from popstack.pipeline.inference import placement_for_this_machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer = OmegaConf.create(GPU_TRAINER)
    assert placement_for_this_machine(trainer, None, None, None) == GPU_TRAINER
    assert placement_for_this_machine(trainer, None, 1, "32-true") == {**GPU_TRAINER, "devices": 1,
                                                                      "precision": "32-true"}


@pytest.mark.parametrize("code", ["ENOSYS", "EOPNOTSUPP"])
def test_run_lock_falls_back_where_flock_is_missing(monkeypatch, tmp_path, caplog, code):
    """Lustre/NFS without flock: an O_EXCL lock file naming its holder; a second process is refused, release frees
    it, and a file left by a dead process of this host is taken over."""
    import errno
    import fcntl
    import json
    import os
    import socket

    from popstack.pipeline.lock import RunLock

    def no_flock(fd, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    caplog.set_level("WARNING", logger="popstack")
    held = tmp_path / ".lock.held"
    with RunLock(tmp_path):
        assert json.loads(held.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}.*delete .*lock.held"):
            RunLock(tmp_path).acquire()
    assert not held.exists()
    assert sum("no flock" in r.getMessage() for r in caplog.records) == 2  # one line per acquire
    with RunLock(tmp_path):  # released: taken again at once
        pass
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    held.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    with RunLock(tmp_path):
        assert json.loads(held.read_text())["pid"] == os.getpid()
    held.write_text(json.dumps({"pid": 1, "host": "another-node", "started": "earlier"}))
    with pytest.raises(UserError, match="pid 1 on another-node"):
        RunLock(tmp_path).acquire()


def test_run_lock_other_flock_errors_are_not_swallowed(monkeypatch, tmp_path):
    import errno
    import fcntl

    from popstack.pipeline.lock import RunLock

    def broken(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        RunLock(tmp_path).acquire()


def test_stale_rank_files_of_a_run_with_more_devices_are_cleared(tmp_path):
    """An earlier prediction on 4 devices left rank2/rank3 files (other values for the same posts): a 1-device
    prediction into the same folder clears them at start and merges only its own."""
    import lightning as L
    import pandas as pd

    from popstack.lightning_modules.extract import KeyedPredictionWriter, merge_rank_outputs
    from tests.helpers import quiet_trainer

    ids = [f"p{i}" for i in range(6)]

    class Scores(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return {"post_id": batch["post_id"], "prediction": batch["x"] * 2}

    batches = torch.utils.data.DataLoader([{"post_id": i, "x": float(k)} for k, i in enumerate(ids)], batch_size=4)
    out = tmp_path / "fold0"
    out.mkdir()
    for rank in (2, 3):
        pd.DataFrame({"post_id": ids, "prediction": [-1.0] * 6}).to_parquet(out / f"rank{rank}.parquet")
    quiet_trainer(callbacks=[KeyedPredictionWriter(out)]).predict(Scores(), batches, return_predictions=False)
    assert sorted(p.name for p in out.glob("rank*")) == ["rank0.parquet"]
    assert merge_rank_outputs(out, ids, world_size=1).prediction.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    pd.DataFrame({"post_id": ids, "prediction": [-1.0] * 6}).to_parquet(out / "rank1.parquet")
    assert merge_rank_outputs(out, ids, world_size=1).prediction.tolist()[1] == 2.0  # only this launch's ranks
    with pytest.raises(ValueError, match="rank2.parquet.*not written"):
        merge_rank_outputs(out, ids, world_size=3)


class FakeGpuCatBoost:
    """Stands in for ``catboost.CatBoostRegressor``: CPU fits are real; GPU fits record how many run at once and
    fail while ``gpu_fails`` says so."""

    gpu_fails = False
    running = 0
    max_running = 0
    gpu_params: list[dict] = []
    guard = None

    real_class = None

    def __init__(self, **params):
        self.params = params
        self.real = None if params["task_type"] == "GPU" else type(self).real_class(**params)

    def fit(self, *args, **kwargs):
        import time

        from catboost import CatBoostError

        if self.real is not None:
            return self.real.fit(*args, **kwargs)
        cls = type(self)
        with cls.guard:
            cls.running += 1
            cls.max_running = max(cls.max_running, cls.running)
            cls.gpu_params.append(self.params)
        time.sleep(0.05)
        with cls.guard:
            cls.running -= 1
        if cls.gpu_fails:
            raise CatBoostError("catboost/cuda/cuda_lib/cuda_base.h: CUDA error 2: out of memory")
        return self

    def predict(self, X):
        import numpy as np

        return self.real.predict(X) if self.real is not None else np.zeros(len(X))


@pytest.fixture
def fake_gpu_catboost(monkeypatch):
    import threading

    import catboost

    import popstack.stacking.members.catboost as members

    FakeGpuCatBoost.gpu_fails, FakeGpuCatBoost.running, FakeGpuCatBoost.max_running = False, 0, 0
    FakeGpuCatBoost.gpu_params, FakeGpuCatBoost.guard = [], threading.Lock()
    FakeGpuCatBoost.real_class = catboost.CatBoostRegressor
    monkeypatch.setattr(catboost, "CatBoostRegressor", FakeGpuCatBoost)
    monkeypatch.setattr(members, "catboost_gpu_count", lambda: 1)
    members.CATBOOST_DEVICE.reset()
    yield FakeGpuCatBoost
    members.CATBOOST_DEVICE.reset()


def _catboost_folds(n_folds: int, **extra):
    """``n_folds`` CatBoost members (the stack's default parameters) fitted on threads, like the stack's jobs."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pandas as pd

    from popstack.stacking.members import make_member
    from popstack.stacking.members.catboost import CatBoostParams

    params = dataclasses.replace(CatBoostParams(), iterations=20, thread_count=1, **extra)
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(120, 4)), columns=list("abcd"))
    y = X.a.to_numpy() + rng.normal(size=120) * 0.1
    members = [make_member("catboost", params, [], seed=k) for k in range(n_folds)]
    with ThreadPoolExecutor(n_folds) as pool:
        list(pool.map(lambda m: m.fit(X[:80], y[:80], X[80:], y[80:]), members))
    return members


def test_catboost_gpu_fits_from_threads_take_turns_with_a_memory_share(fake_gpu_catboost):
    members = _catboost_folds(4)
    assert fake_gpu_catboost.max_running == 1 and len(fake_gpu_catboost.gpu_params) == 4
    for p in fake_gpu_catboost.gpu_params:
        assert p["gpu_ram_part"] == 0.5 and p["devices"] == "0" and "rsm" not in p
    assert all(m.model.real is None for m in members)  # every fold on the GPU


def test_catboost_gpu_failure_moves_every_fold_to_the_cpu_with_one_warning(fake_gpu_catboost, caplog):
    fake_gpu_catboost.gpu_fails = True
    caplog.set_level("WARNING", logger="popstack")
    members = _catboost_folds(4)
    assert len(fake_gpu_catboost.gpu_params) == 1  # tried once, then decided
    assert all(m.model.real is not None for m in members)  # no mix: every fold on the CPU
    assert all("gpu_ram_part" not in m.model.params and "devices" not in m.model.params for m in members)
    assert sum("GPU fit failed" in r.getMessage() for r in caplog.records) == 1


def test_catboost_gpu_failure_fails_loudly_when_asked_or_after_gpu_folds(fake_gpu_catboost):
    from popstack.stacking.members import MemberResourceError

    fake_gpu_catboost.gpu_fails = True
    with pytest.raises(MemberResourceError, match="gpu_fallback=cpu"):
        _catboost_folds(1, gpu_fallback="error")
    fake_gpu_catboost.gpu_fails = False
    _catboost_folds(1)
    fake_gpu_catboost.gpu_fails = True
    with pytest.raises(MemberResourceError, match="earlier fits of this run ran on the GPU"):
        _catboost_folds(1)


def test_tabnet_cuda_out_of_memory_is_one_clear_error(monkeypatch):
    import numpy as np
    import pandas as pd
    from pytorch_tabnet.tab_model import TabNetRegressor

    from popstack.stacking.members import MemberResourceError, make_member

    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TabNetRegressor, "fit", oom)
    X = pd.DataFrame(np.random.default_rng(0).normal(size=(64, 3)), columns=list("abc"))
    member = make_member("tabnet", {"max_epochs": 1, "batch_size": 32}, [], seed=0)
    with pytest.raises(MemberResourceError, match="tabnet: CUDA out of memory .*64 rows.*batch_size=32"):
        member.fit(X, np.arange(64.0), X, np.arange(64.0))


def _jpeg(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A photo-like test image: low-frequency colour blobs (JPEG re-encoding keeps them well)."""
    import io

    import numpy as np
    from PIL import Image

    base = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def _float_reference(data: bytes, size: int) -> torch.Tensor:
    """The image path before uint8 batches: PIL draft, bicubic shorter side, centre crop, float normalisation."""
    import io

    import numpy as np
    from PIL import Image

    from popstack.datamodules.shards import CLIP_MEAN, CLIP_STD

    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (300, 200), (64, 64), (50, 40)])
def test_uint8_images_normalised_later_equal_the_float_path(w, h):
    """uint8 images from the loaders, normalised later (on the device): the numbers of the float path."""
    from popstack.datamodules.shards import ImagePreprocessor, normalise_images

    data = _jpeg(w, h)
    image, ok = ImagePreprocessor(64)(data)
    assert ok and image.dtype == torch.uint8 and image.shape == (3, 64, 64)
    diff = (normalise_images(image[None])[0] - _float_reference(data, 64)).abs()
    assert diff.max() < 1e-5


def test_png_missing_and_broken_images_on_the_uint8_path():
    from popstack.datamodules.shards import ImagePreprocessor, normalise_images

    pre = ImagePreprocessor(32)
    png, ok = pre(_jpeg(90, 60, fmt="PNG"))
    assert ok and png.shape == (3, 32, 32)
    for data in (None, b"", _jpeg(90, 60)[:200], b"not an image"):
        blank, ok = pre(data)
        assert not ok and blank.dtype == torch.uint8
        assert normalise_images(blank[None]).abs().max() < 0.01  # the mean colour: about zero once normalised
    x = torch.randn(2, 3, 4, 4)
    assert normalise_images(x) is x  # float batches are taken as already normalised


def test_presized_shards_store_the_model_input_size_and_embed_alike(tmp_path):
    """Shards re-encoded so the shorter side is the model's input size: small files, the same embeddings (tiny
    CLIP) as the original bytes within tolerance; smaller images are stored as they are."""
    import io

    import pandas as pd
    import webdataset as wds
    from PIL import Image

    from popstack.datamodules.shards import ImagePreprocessor, build_vocab, shard_urls, write_shards
    from popstack.lightning_modules.backbone import TINY_MODEL, encode_posts, load_backbone, register_local_configs

    sizes = [(640, 480), (480, 640), (200, 150), (40, 30)]
    rows = []
    for i, (w, h) in enumerate(sizes):
        rel = f"train/u@N01/{i}.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_jpeg(w, h, seed=i))
        rows.append({"post_id": str(i), "uid": "u@N01", "split": "train", "row": i, "image_relpath": rel,
                     "image_status": "ok", "category": "c", "subcategory": "s", "concept": "k", "title": "t",
                     "alltags": "", "label": 1.0})
    posts = pd.DataFrame(rows)
    register_local_configs()
    bb = load_backbone(TINY_MODEL, None)
    size = bb.image_size
    write_shards(posts, tmp_path, tmp_path / "orig", split="train", class_ids=build_vocab(posts), workers=1)
    write_shards(posts, tmp_path, tmp_path / "small", split="train", class_ids=build_vocab(posts),
                 image_short_side=size, workers=2)
    pre = ImagePreprocessor(size)

    def images(folder):
        samples = list(wds.WebDataset(shard_urls(tmp_path / folder, ["train"]), shardshuffle=False))
        return [s["jpg"] for s in samples]

    orig, small = images("orig"), images("small")
    for (w, h), data in zip(sizes, small):
        with Image.open(io.BytesIO(data)) as im:
            assert min(im.size) == min(size, min(w, h)) and (im.size[0] >= im.size[1]) == (w >= h)
    assert sum(map(len, small)) < sum(map(len, orig)) / 4
    tokens = bb.tokenizer(["t"] * len(sizes))
    with torch.no_grad():
        a = encode_posts(bb.model, torch.stack([pre(d)[0] for d in orig]), tokens, 4)["image_emb"]
        b = encode_posts(bb.model, torch.stack([pre(d)[0] for d in small]), tokens, 4)["image_emb"]
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


def test_prepare_pool_writes_the_same_shards_as_one_process(tmp_path):
    import pandas as pd
    import webdataset as wds

    from popstack.datamodules.shards import build_vocab, shard_urls, write_shards

    rows = []
    for i in range(12):
        rel = f"train/u@N01/{i}.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if i != 5:  # one file missing on disk; one the reader already marked missing
            (tmp_path / rel).write_bytes(_jpeg(120, 90, seed=i) if i != 7 else b"\xff\xd8broken")
        rows.append({"post_id": str(i), "uid": "u@N01", "split": "train", "row": i, "image_relpath": rel,
                     "image_status": "missing" if i == 9 else "ok", "category": "c", "subcategory": "s",
                     "concept": "k", "title": "t", "alltags": "", "label": 1.0})
    posts = pd.DataFrame(rows)
    infos = {}
    for workers in (1, 3):
        infos[workers] = write_shards(posts, tmp_path, tmp_path / f"w{workers}", split="train", shard_size=5,
                                      class_ids=build_vocab(posts), image_short_side=48, workers=workers)
    assert infos[1].image_status == infos[3].image_status
    assert [infos[1].image_status[k] for k in ("5", "7", "9")] == ["missing", "unreadable", "missing"]

    def content(folder):
        return [(s["__key__"], s["json"], s.get("jpg")) for s in
                wds.WebDataset(shard_urls(tmp_path / folder, ["train"]), shardshuffle=False)]

    assert content("w1") == content("w3") and [k for k, _, _ in content("w1")] == [str(i) for i in range(12)]


def test_num_workers_auto_is_the_cores_of_this_rank(monkeypatch):
    import os

    from popstack.datamodules import cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cores.loader_workers(3, 8, env={}) == 3
    assert cores.loader_workers("auto", 1, env={}) == 15
    assert cores.loader_workers("auto", 8, env={}) == 1  # Lightning's launcher: 8 ranks share 16 cores
    assert cores.loader_workers("auto", 1, env={"LOCAL_WORLD_SIZE": "4"}) == 3  # torchrun
    slurm = {"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "8"}
    assert cores.loader_workers("auto", 8, env=slurm) == 15  # srun --cpus-per-task 16: the task's own cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cores.loader_workers("auto", 1, env={}) == 1
    assert cores.loader_workers("auto", 2, env={}) == 0  # one core per rank: decode in the rank itself


def test_auto_workers_raise_no_dataloader_warning_here(tmp_path):
    """On this machine (however few cores) ``auto`` never asks for more workers than the DataLoader suggests."""
    import warnings

    import pandas as pd

    from popstack.datamodules.cores import loader_workers
    from popstack.datamodules.shards import (
        Collate,
        SampleDecoder,
        build_vocab,
        make_eval_pipeline,
        make_loader,
        shard_urls,
    )
    from popstack.lightning_modules.backbone import TINY_MODEL, load_backbone, register_local_configs

    rel = "train/u@N01/0.jpg"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes(_jpeg(80, 60))
    posts = pd.DataFrame([{"post_id": "0", "uid": "u@N01", "split": "train", "row": 0, "image_relpath": rel,
                           "image_status": "ok", "category": "c", "subcategory": "s", "concept": "k", "title": "t",
                           "alltags": "", "label": 1.0}])
    write_shards_dir = tmp_path / "shards"
    from popstack.datamodules.shards import write_shards

    write_shards(posts, tmp_path, write_shards_dir, split="train", class_ids=build_vocab(posts))
    register_local_configs()
    bb = load_backbone(TINY_MODEL, None)
    workers = loader_workers("auto")
    pipe = make_eval_pipeline(shard_urls(write_shards_dir, ["train"]), decoder=SampleDecoder(bb.image_size, "title"),
                              collate=Collate(bb.tokenizer), batch_size=4, rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = make_loader(pipe, workers)
        batches = list(loader)
    torch_loader = loader.pipeline[0]
    assert torch_loader.persistent_workers == (workers > 0)
    assert not torch_loader.pin_memory  # no CUDA here: nothing to pin
    assert batches[0]["image"].dtype == torch.uint8


def test_cache_parts_written_per_rank_then_merged_by_post_id(tmp_path):
    """Each rank writes its own arrays (rows in its encoding order); rank 0 merges them into the final arrays by
    post id and deletes the parts: no file is written by two ranks."""
    import numpy as np

    from popstack.lightning_modules.embed import (
        CACHE_ARRAYS,
        RANK_PART,
        allocate_cache,
        merge_rank_parts,
        open_cache_arrays,
    )

    post_ids = [f"p{i}" for i in range(7)]
    written = [["p3", "p0", "p6"], ["p1", "p5", "p2", "p4"], []]  # a third rank with no shard
    for rank, ids in enumerate(written):
        part = allocate_cache(tmp_path / RANK_PART.format(rank=rank), len(ids), 4, 2)
        for j, pid in enumerate(ids):
            i = post_ids.index(pid)
            part["image_emb"][j] = i
            part["text_emb"][j] = -i
            part["text_tokens"][j] = i / 2
            part["text_mask"][j] = i % 2 == 0
            part["has_image"][j] = i != 5
        for arr in part.values():
            arr.flush()
        del part
    merge_rank_parts(tmp_path, post_ids, written, 4, 2)
    final = open_cache_arrays(tmp_path, mode="r")
    ids = np.arange(7)
    assert (final["image_emb"][:, 0] == ids).all() and (final["text_emb"][:, 3] == -ids).all()
    assert (final["text_tokens"][:, 1, 2] == ids / 2).all()
    assert (final["text_mask"][:, 0] == (ids % 2 == 0)).all() and (final["has_image"] == (ids != 5)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.npy" for n in CACHE_ARRAYS)
    with pytest.raises(ValueError, match="more than once"):
        merge_rank_parts(tmp_path / "again", post_ids, [["p0"], ["p0"]], 4, 2)

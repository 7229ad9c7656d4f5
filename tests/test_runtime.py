"""GPU-path pieces that run on a CPU: seeded sampling and augmentation, the image cache, AMP and schedule."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import parse_dataclass
from pipeline.data import ImageArray, TrainSet, cached_images
from pipeline.errors import SpmlError
from pipeline.runtime.distributed import EpochSampler
from pipeline.runtime.optim import amp_dtype, build_scheduler
from pipeline.run_config import RuntimeConfig, TrainConfig


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_cover_everything():
    s = EpochSampler(10, seed=5)
    s.set_epoch(1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10))
    assert list(s) == first  # same epoch, same order and seeds
    s.set_epoch(2)
    assert [i for i, _ in s] != [i for i, _ in first]
    # two DDP ranks: equal lengths (wrapped padding), together every row
    s.set_epoch(1)
    shards = []
    for rank in (0, 1, 2):
        r = EpochSampler(10, seed=5, rank=rank, world_size=3)
        r.set_epoch(1)
        shards.append(list(r))
        assert len(shards[-1]) == len(r) == 4
    assert {i for shard in shards for i, _ in shard} == set(range(10))
    seeds = dict(first)
    assert all(seeds[i] == seed for shard in shards for i, seed in shard)  # a row's seed is rank-independent
    # evaluation: in order, disjoint, no padding
    ev = [list(EpochSampler(7, 0, shuffle=False, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(i for shard in ev for i, _ in shard) == list(range(7))


def test_augmentation_depends_on_the_sample_seed_only():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.zeros(12, 3)
    ds = TrainSet(images, labels, labels, strong=True)
    torch.manual_seed(1)
    a = ds[(3, 1234)]
    torch.manual_seed(99)
    state = torch.get_rng_state()
    b = ds[(3, 1234)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["strong"], b["strong"])
    assert any(not torch.equal(ds[(3, s)]["strong"], a["strong"]) for s in range(5))

    def batches(workers):
        sampler = EpochSampler(12, seed=3)
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers, generator=torch.Generator())
        return [(b["index"], b["image"], b["strong"]) for b in loader]

    for (i0, w0, s0), (i2, w2, s2) in zip(batches(0), batches(2)):
        assert torch.equal(i0, i2) and torch.equal(w0, w2) and torch.equal(s0, s2)


def _write_images(root, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        rel = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / rel)
        paths.append(rel)
    return paths


def test_image_cache_is_built_once_keyed_and_atomic(tmp_path, monkeypatch):
    root = tmp_path / "raw"
    root.mkdir()
    paths = _write_images(root, 5)
    cache_dir = tmp_path / "cache"
    path = cached_images(root, paths, 16, cache_dir, "src")
    arr = np.load(path, mmap_mode="r")
    assert arr.shape == (5, 3, 16, 16) and arr.dtype == np.uint8
    expected = np.asarray(Image.open(root / "img2.png").convert("RGB").resize((16, 16), Image.BILINEAR))
    assert np.array_equal(arr[2], expected.transpose(2, 0, 1))
    assert [p.name for p in cache_dir.iterdir()] == [path.name]  # no temporaries left

    import pipeline.data as data_mod

    monkeypatch.setattr(data_mod, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("re-decoded")))
    assert cached_images(root, paths, 16, cache_dir, "src") == path  # reused, nothing decoded
    monkeypatch.undo()
    assert cached_images(root, paths, 24, cache_dir, "src") != path  # another size, another file
    assert cached_images(root, paths[:4], 16, cache_dir, "src") != path  # another image list, another file

    view = ImageArray(path, np.array([4, 1]))
    assert len(view) == 2 and torch.equal(view[1], torch.from_numpy(np.array(arr[1])))
    clone = pickle.loads(pickle.dumps(view))
    assert len(pickle.dumps(view)) < 2000 and torch.equal(clone[0], view[0])  # pickles as a path


def test_broken_image_fails_the_cache_cleanly(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    paths = _write_images(root, 2)
    (root / "img1.png").write_bytes(b"not an image")
    with pytest.raises(SpmlError, match="img1.png"):
        cached_images(root, paths, 8, tmp_path / "cache", "src")
    assert not any((tmp_path / "cache").iterdir())


def test_amp_is_opt_in_and_onecycle_follows_torch_per_iteration():
    assert amp_dtype(True, "auto", torch.device("cpu")) is None
    assert amp_dtype(True, "fp16", torch.device("cpu")) is None
    assert amp_dtype(True, "bf16", torch.device("cpu")) is torch.bfloat16  # explicit CPU bf16
    assert amp_dtype(False, "bf16", torch.device("cpu")) is None
    assert amp_dtype(False, "bf16", torch.device("cuda")) is None
    model = torch.nn.Linear(2, 2)
    groups = [{"params": [model.weight], "lr": 1e-5}, {"params": [model.bias], "lr": 1e-4}]
    opt = torch.optim.AdamW(groups, lr=1e-5)
    assert build_scheduler("none", opt, 3, 10, 0.2) is None
    sched = build_scheduler("onecycle", opt, 3, 10, 0.2)  # 30 iterations, the peak after 20%
    lrs = []
    for _ in range(30):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([1e-5 / 25, 1e-4 / 25])  # div_factor 25
    peak = max(range(30), key=lambda i: lrs[i][0])
    assert peak == 5 and lrs[peak] == pytest.approx([1e-5, 1e-4])  # each group peaks at its own lr
    assert lrs[-1][0] < 1e-5 / 25  # annealed far below the start (final_div_factor 1e4)


def test_train_config_validates_the_new_options():
    from tests.conftest import tiny_params

    train = tiny_params()["train"]["default"]
    cfg = parse_dataclass(TrainConfig, {**train, "scheduler": "onecycle", "amp": True}, "train")
    assert cfg.scheduler == "onecycle" and cfg.amp_dtype == "auto"
    with pytest.raises(SpmlError, match="train.scheduler"):
        parse_dataclass(TrainConfig, {**train, "scheduler": "cosine"}, "train")
    with pytest.raises(SpmlError, match="train.augment_on"):
        parse_dataclass(TrainConfig, {**train, "augment_on": "gpu"}, "train")
    runtime = tiny_params()["runtime"]
    for key, bad in (("host_allocator", "mimalloc"), ("compile", "yes"), ("channels_last", 1)):
        with pytest.raises(SpmlError, match=f"runtime.{key}"):
            parse_dataclass(RuntimeConfig, {**runtime, key: bad}, "runtime")
    with pytest.raises(SpmlError, match="unknown params train.threads"):  # a runtime key in the train block
        parse_dataclass(TrainConfig, {**train, "threads": 1}, "train")
    # the device makes the standard views only: Xie et al.'s (augment: lac) stay in the loader
    from pipeline.train import build_normalizer

    cfg = parse_dataclass(TrainConfig, {**train, "augment": "lac", "augment_on": "device"}, "train")
    assert build_normalizer(cfg, torch.device("cpu"), False).augment is None
    assert build_normalizer(parse_dataclass(TrainConfig, {**train, "augment_on": "device"}, "train"),
                            torch.device("cpu"), False).augment is not None


# ---------------------------------------------------------------- host memory: the caching allocator


def _libs(tmp_path, *names):
    """A fake library folder holding ``names`` (empty files: only their presence is looked at)."""
    folder = tmp_path / "lib"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return [folder]


def _maps(tmp_path, *libraries):
    """A fake /proc/self/maps listing ``libraries`` (and libc)."""
    lines = [f"7f00-7f01 r-xp 00000000 08:01 1 {lib}" for lib in ("/usr/lib/x86_64-linux-gnu/libc.so.6", *libraries)]
    path = tmp_path / "maps"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_find_allocator_prefers_jemalloc_then_tcmalloc_and_glibc_needs_none(tmp_path):
    from pipeline.runtime import host

    assert host.find_allocator("auto", _libs(tmp_path)) is None
    dirs = _libs(tmp_path, "libtcmalloc_minimal.so.4")
    assert host.find_allocator("auto", dirs) == ("tcmalloc", dirs[0] / "libtcmalloc_minimal.so.4")
    assert host.find_allocator("jemalloc", dirs) is None
    dirs = _libs(tmp_path, "libjemalloc.so.2")
    assert host.find_allocator("auto", dirs) == ("jemalloc", dirs[0] / "libjemalloc.so.2")
    assert host.find_allocator("tcmalloc", dirs)[0] == "tcmalloc"
    assert host.find_allocator("glibc", dirs) is None
    with pytest.raises(SpmlError, match="must be one of auto, jemalloc, tcmalloc, glibc"):
        host.find_allocator("mimalloc", dirs)


def test_reexec_preloads_the_library_once_and_keeps_the_users_settings(tmp_path, monkeypatch):
    from pipeline.runtime import host

    monkeypatch.setattr(host.platform, "system", lambda: "Linux")
    dirs, maps = _libs(tmp_path, "libjemalloc.so.2"), _maps(tmp_path)
    argv = ["-m", "pipeline.cli", "train", "synthetic", "an"]
    exe, args, env = host.reexec_command("auto", {"LD_PRELOAD": "/opt/mine.so", "PATH": "/bin"}, argv, "/py", dirs,
                                         maps)
    assert exe == "/py" and args == ["/py", *argv]
    assert env["LD_PRELOAD"] == f"{dirs[0] / 'libjemalloc.so.2'} /opt/mine.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1" and env[host.REEXEC_MARK] == "jemalloc"
    # the re-executed process (the marker) never re-executes again, even where the preload did not take
    assert host.reexec_command("auto", env, argv, "/py", dirs, maps) is None
    # a user's MALLOC_CONF wins; $SPML_ALLOCATOR wins over params; glibc asked for: nothing to do
    assert host.reexec_command("auto", {"MALLOC_CONF": "narenas:1"}, argv, "/py", dirs, maps)[2]["MALLOC_CONF"] == \
        "narenas:1"
    assert host.reexec_command("auto", {host.ALLOCATOR_ENV: "glibc"}, argv, "/py", dirs, maps) is None
    assert host.reexec_command("glibc", {}, argv, "/py", dirs, maps) is None
    assert host.reexec_command("glibc", {host.ALLOCATOR_ENV: "jemalloc"}, argv, "/py", dirs, maps) is not None
    with pytest.raises(SpmlError, match="SPML_ALLOCATOR 'nope'"):
        host.reexec_command("auto", {host.ALLOCATOR_ENV: "nope"}, argv, "/py", dirs, maps)
    # no library installed, or one already running (preloaded by the user): nothing to do
    assert host.reexec_command("auto", {}, argv, "/py", [], maps) is None
    assert host.reexec_command("auto", {}, argv, "/py", dirs, _maps(tmp_path, "/opt/libtcmalloc.so.4")) is None
    monkeypatch.setattr(host.platform, "system", lambda: "Darwin")
    assert host.reexec_command("auto", {}, argv, "/py", dirs, maps) is None


def test_the_command_line_says_which_allocator_before_torch_is_imported(tmp_path, monkeypatch):
    from pipeline.runtime import host

    monkeypatch.chdir(tmp_path)
    assert host.requested_allocator(["train", "synthetic", "an"]) == "auto"  # no params.yaml: the command says so
    (tmp_path / "params.yaml").write_text("runtime:\n  host_allocator: tcmalloc\n")
    (tmp_path / "other.yaml").write_text("runtime:\n  host_allocator: glibc\n")
    assert host.requested_allocator(["train", "synthetic", "an"]) == "tcmalloc"
    assert host.requested_allocator(["train", "synthetic", "an", "--params", "other.yaml"]) == "glibc"
    assert host.requested_allocator(["bench", "step", "--params=other.yaml"]) == "glibc"
    assert host.requested_allocator(["bench", "step", "--host-allocator", "jemalloc"]) == "jemalloc"
    assert host.requested_allocator(["bench", "step", "--host-allocator=glibc"]) == "glibc"
    assert host.requested_allocator(["bench", "step", "--host-allocator", "nope"]) is None  # the bench reports it
    for args in (["config", "synthetic", "an"], ["aggregate"], ["--help"], []):
        assert host.requested_allocator(args) is None  # nothing to gain outside train and bench


def test_without_a_caching_allocator_glibc_keeps_freed_memory_and_the_notice_says_how_to_install(tmp_path,
                                                                                              monkeypatch):
    from pipeline.runtime import host

    monkeypatch.setattr(host, "library_dirs", list)
    monkeypatch.setattr(host, "cache_host_memory", lambda: True)
    memory = host.host_memory("auto", True, {}, _maps(tmp_path))
    assert (memory.allocator, memory.label) == ("glibc", "cache")
    assert "apt-get install libjemalloc2" in memory.notice
    assert host.host_memory("glibc", False, {}, _maps(tmp_path)).label == "system"
    assert "install" not in host.host_memory("glibc", True, {}, _maps(tmp_path)).notice
    jemalloc = host.host_memory("auto", True, {}, _maps(tmp_path, "/usr/lib/libjemalloc.so.2"))
    assert (jemalloc.allocator, jemalloc.label) == ("jemalloc", "jemalloc")
    assert jemalloc.notice == "host memory: jemalloc (/usr/lib/libjemalloc.so.2)"
    with pytest.raises(SpmlError, match="params runtime.host_allocator 'x'"):
        host.host_memory("x", True, {}, _maps(tmp_path))


# ---------------------------------------------------------------- runtime.compile


def _compiles() -> bool:
    import shutil

    return hasattr(torch, "compile") and (shutil.which("cc") or shutil.which("gcc")) is not None


@pytest.mark.slow
@pytest.mark.skipif(not _compiles(), reason="torch.compile needs torch >= 2 and a C compiler (inductor's CPU backend)")
def test_compiled_model_trains_to_the_eager_losses():
    """runtime.compile on the CPU, smallcnn at width 8, IGNORE (a training and a no-grad forward per step): the
    same losses, step by step, as eager to float tolerance, and state_dict keys unchanged (checkpoints load)."""
    import dataclasses

    from pipeline.contracts import MethodContext
    from pipeline.run_config import resolve_run_config
    from pipeline.tools import bench
    from pipeline.train import build_normalizer, build_training, train_step
    from tests.conftest import tiny_params

    run = resolve_run_config(tiny_params(), "synthetic", "ignore", 0)
    data = bench.random_data(8, 5, 32, seed=0)
    device = torch.device("cpu")
    losses, keys, traced = {}, {}, []
    for compiled in (False, True):
        cfg = run.train
        ctx = MethodContext("synthetic", cfg.model, 5, 8, cfg.epochs, 4, 1.5, data.observed, device)
        torch.manual_seed(0)
        training = build_training(dataclasses.replace(run, runtime=dataclasses.replace(run.runtime, compile=compiled)),
                                  ctx)
        batches = bench._batches(data, 4, build_normalizer(cfg, device, False), True, 0, "observed")
        training.model.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
        training.model.train()
        losses[compiled] = [train_step(training, batches[i % 2][0], cfg.epochs).loss.item() for i in range(3)]
        keys[compiled] = list(training.model.state_dict())
    assert any(traced), "the compiled model's forward never ran under torch.compile"
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)
    assert keys[True] == keys[False]

"""``spml bench``: training-step time (and memory) of several methods on the same model, batch and data.

Each method gets its own copy of one initial model and its own optimizer; all see the same batches. After
``--warmup`` untimed steps per method, the timed steps alternate between the methods (step 1 of every
method, then step 2, ...) so that drifting machine load affects all of them alike. One step is what the
training loop does per batch: ``method.training_step`` + ``zero_grad`` + ``backward`` + ``optimizer.step``
+ ``after_optimizer_step``; data loading and augmentation are not timed. The step runs at the last epoch
of a notional 10-epoch run, past any warm-up, so methods that reject after a warm-up do so.

Host memory: like ``spml train``, the bench first makes glibc's malloc keep freed memory for reuse
(``runtime.host.cache_host_memory``; params ``train.host_malloc_cache``); ``--host-malloc system`` times glibc's
default instead, which page-faults each step's activations in again (it costs IGNORE, with its larger working
set, relatively more than AN). The header line says which one ran.

Output, one line per method: median ms/step, images/s, ratio of the median to AN's as ``N.NNx``, the median
minor page faults of the process per step (Unix), and memory:
on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the method's steps (all models' weights
included) and the part above the allocation at step start; on CPU the bytes of the tensors autograd saves
for backward in one step (an estimate of activation memory, measured with saved-tensor hooks), since a
process RSS cannot be split between methods that share the process.

This module imports only torch and numpy at module level (the GPU machine has no typer, dvc or
pycocotools): ``python -m pipeline.bench --methods an,ignore``. Extension points: models and their options
(``--model``, ``--model-kwargs`` for tiny variants, ``--weights``: random init unless given, so no download),
mixed precision (``--amp``: bf16 autocast where the GPU supports it, fp16 otherwise; ignored on CPU) and
``--channels-last`` (model and batches in NHWC; cudnn.benchmark is on for CUDA), and ``--prepare DATASET``, which calls
``pipeline.bench_prepare.run(dataset)`` and benchmarks on the ``BenchData`` it returns (random synthetic
batches otherwise).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BENCH_EPOCHS = 10


class BenchError(Exception):
    """A user-fixable bench problem (bad option, missing module); printed as one line, exit code 2."""


@dataclass
class BenchData:
    """uint8 images (N, 3, S, S), observed labels (N, C) in {0, 1} (or -1), full labels (N, C)."""

    images: torch.Tensor
    observed: torch.Tensor
    full: torch.Tensor
    instances: torch.Tensor | None = None
    instance_classes: torch.Tensor | None = None


@dataclass
class BenchResult:
    method: str
    times_ms: list[float]
    batch_size: int
    memory_mib: float | None = None
    memory_step_mib: float | None = None
    memory_kind: str = ""
    host_malloc: str = ""  # "cache" (runtime.host.cache_host_memory applied) or "system"
    page_faults: list[int] = field(default_factory=list)  # minor page faults of the process per timed step
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def images_per_s(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms


def random_data(num_images: int, num_classes: int, image_size: int, seed: int = 0) -> BenchData:
    """Random images with 1 to 4 true labels per image and one observed positive among them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    full = torch.zeros(num_images, num_classes)
    observed = torch.zeros(num_images, num_classes)
    for i in range(num_images):
        k = int(torch.randint(1, min(4, num_classes) + 1, (), generator=g))
        classes = torch.randperm(num_classes, generator=g)[:k]
        full[i, classes] = 1
        observed[i, classes[0]] = 1
    return BenchData(images, observed, full)


def _batches(data: BenchData, batch_size: int, device: torch.device, strong: bool, seed: int):
    """Fixed device batches (weak view, and a flipped + colour-jittered stand-in for the strong view)."""
    from pipeline.methods import Batch

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    g = torch.Generator().manual_seed(seed)
    n = len(data.images)
    out = []
    for start in range(0, n - batch_size + 1, batch_size):
        idx = torch.arange(start, start + batch_size)
        img = data.images[idx].to(device).float()
        weak = (img - mean) / std
        strong_view = None
        if strong:
            jitter = 1.0 + 0.3 * (torch.rand(batch_size, 1, 1, 1, generator=g) - 0.5)
            strong_view = ((img.flip(-1) * jitter.to(device)).clamp(0, 255) - mean) / std
        out.append(Batch(
            index=idx.to(device), image=weak, observed=data.observed[idx].to(device).float(),
            full=data.full[idx].to(device).float(), strong=strong_view,
            instances=data.instances[idx].to(device) if data.instances is not None else None,
            instance_classes=data.instance_classes[idx].to(device) if data.instance_classes is not None else None,
        ))
    if not out:
        raise BenchError(f"bench data has {n} images, fewer than one batch of {batch_size}; lower --batch-size")
    return out


def _load_params(path: Path | None) -> dict[str, Any]:
    """params.yaml if it exists and PyYAML is installed (method/model settings), else {}."""
    if path is None or not Path(path).exists():
        return {}
    from pipeline.config import load_params

    try:
        return load_params(path)
    except ImportError:  # no PyYAML on this machine: constructor and dataclass defaults
        return {}


def _method_params(params: dict[str, Any], method_cls, dataset: str, model: str) -> dict[str, Any]:
    from pipeline.config import deep_merge, scoped

    blocks = params.get("method_params") or {}
    base = getattr(method_cls, "params_base", None)
    return deep_merge(scoped(blocks.get(base), dataset, model) if base else {},
                      scoped(blocks.get(method_cls.name), dataset, model))


def _saved_tensor_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``step()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run_bench(methods: list[str], model: str = "smallcnn", image_size: int = 64, batch_size: int = 32,
              steps: int = 20, warmup: int = 3, device: str = "auto", num_classes: int = 20,
              dataset: str = "synthetic", params_path: Path | None = Path("params.yaml"), seed: int = 0,
              prepare: str | None = None, num_batches: int = 4, threads: int | None = None,
              amp: bool = False, channels_last: bool = False, weights: str | None = None,
              model_kwargs: dict[str, Any] | None = None, host_malloc: str | None = None) -> list[BenchResult]:
    from pipeline.errors import SpmlError
    from pipeline.methods import MethodContext, build_method, get_method_class
    from pipeline.models import build_model, parse_model_params
    from pipeline.runtime.host import cache_host_memory
    from pipeline.runtime.optim import amp_dtype as autocast_dtype
    from pipeline.runtime.optim import autocast

    if not methods:
        raise BenchError("--methods is empty; pass e.g. --methods an,ignore")
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise BenchError("--steps must be >= 1, --warmup >= 0 and --batch-size >= 1")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: CUDA is not available here; use --device cpu")
    torch.manual_seed(seed)
    if threads:  # on a shared CPU, fewer intra-op threads than busy cores avoids spin-wait blow-ups
        torch.set_num_threads(threads)

    if prepare:
        try:
            bench_prepare = importlib.import_module("pipeline.bench_prepare")
        except ModuleNotFoundError as exc:
            if exc.name != "pipeline.bench_prepare":
                raise
            raise BenchError("--prepare needs pipeline/bench_prepare.py, which this checkout lacks; "
                             "drop --prepare to benchmark on random data") from None
        data = bench_prepare.run(prepare)
        if not isinstance(data, BenchData):
            raise BenchError(f"pipeline.bench_prepare.run({prepare!r}) returned {type(data).__name__}, "
                             "not pipeline.bench.BenchData")
        dataset, num_classes, image_size = prepare, data.full.shape[1], data.images.shape[-1]
    else:
        data = random_data(batch_size * num_batches, num_classes, image_size, seed)

    params = _load_params(params_path)
    if host_malloc is None:  # as training does: params train.host_malloc_cache (default on)
        from pipeline.config import scoped

        host_malloc = "cache" if scoped(params.get("train"), dataset, model).get("host_malloc_cache", True) else "system"
    if host_malloc not in ("cache", "system"):
        raise BenchError(f"--host-malloc {host_malloc!r}: use cache or system")
    malloc_used = "cache" if host_malloc == "cache" and cache_host_memory() else "system"
    extra_kwargs = model_kwargs or {}
    try:  # the same check as `spml train`: a model's sizes live only in params.yaml (no second default in code)
        model_kwargs = parse_model_params(model, (params.get("models") or {}).get(model))
    except SpmlError as exc:
        raise BenchError(f"{exc} (bench reads {params_path}: run from the project folder or pass --params)") from None
    model_kwargs.update(extra_kwargs)
    if weights is not None:
        model_kwargs["weights"] = weights
    elif "weights" in model_kwargs:  # timing needs no pretrained weights (and no download)
        model_kwargs["weights"] = "none"
    amp_dtype = autocast_dtype(amp, "auto", dev)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    classes = {name: get_method_class(name) for name in methods}
    strong = any(cls.needs_strong_view for cls in classes.values())
    batches = _batches(data, batch_size, dev, strong, seed)
    for b in batches:
        b.image = b.image.contiguous(memory_format=memory_format)
        if b.strong is not None:
            b.strong = b.strong.contiguous(memory_format=memory_format)

    runners = []
    base_models: dict[str, torch.nn.Module] = {}
    for name, cls in classes.items():
        ctx = MethodContext(dataset=dataset, model=model, num_classes=num_classes, num_train=len(data.images),
                            epochs=BENCH_EPOCHS, steps_per_epoch=len(batches), mean_positives=float(
                                data.full.sum(1).mean()), observed_train=data.observed.to(dev).float(), device=dev)
        method = build_method(name, _method_params(params, cls, dataset, model), ctx)
        extra = method.model_kwargs()  # a method may need its own model variant (plc-lac: a projector)
        key = repr(sorted(extra.items()))
        if key not in base_models:
            torch.manual_seed(seed)
            base_models[key] = build_model(model, num_classes, **{**model_kwargs, **extra}).to(
                dev, memory_format=memory_format)
        net = copy.deepcopy(base_models[key])
        groups = [g for g in net.parameter_groups(1e-4, 1.0) + method.parameter_groups(1e-4) if g["params"]]
        runners.append((name, net, method, torch.optim.Adam(groups, lr=1e-4)))

    def make_step(net, method, optimizer, batch):
        def step():
            with autocast(dev, amp_dtype):
                out = method.training_step(net, batch, BENCH_EPOCHS)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            method.after_optimizer_step(batch, BENCH_EPOCHS)
        return step

    try:
        import resource

        def faults() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not on Unix
        faults = None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for name, net, method, opt in runners:
        net.train()
        method.on_epoch_start(BENCH_EPOCHS)
        for i in range(warmup):
            make_step(net, method, opt, batches[i % len(batches)])()
    sync()

    results = {name: BenchResult(name, [], batch_size, host_malloc=malloc_used) for name, *_ in runners}
    for i in range(steps):
        batch = batches[i % len(batches)]
        for name, net, method, opt in runners:
            step = make_step(net, method, opt, batch)
            if dev.type == "cuda":
                start_alloc = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            sync()
            f0 = faults() if faults else 0
            t0 = time.perf_counter()
            step()
            sync()
            results[name].times_ms.append(1000.0 * (time.perf_counter() - t0))
            if faults:
                results[name].page_faults.append(faults() - f0)
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated(dev)
                r = results[name]
                r.memory_mib = max(r.memory_mib or 0.0, peak / 2**20)
                r.memory_step_mib = max(r.memory_step_mib or 0.0, (peak - start_alloc) / 2**20)
                r.memory_kind = "cuda"

    if dev.type != "cuda":  # one extra, untimed step per method to measure what autograd keeps
        for name, net, method, opt in runners:
            saved = _saved_tensor_bytes(make_step(net, method, opt, batches[0]))
            results[name].memory_step_mib = saved / 2**20
            results[name].memory_kind = "cpu-saved"
    for name, _, method, _ in runners:  # drop what the meters accumulated
        method.fn_meter.reset()
    return [results[name] for name in methods]


def format_results(results: list[BenchResult], header: dict[str, Any] | None = None) -> str:
    ref = next((r for r in results if r.method == "an"), None)
    lines = []
    if header:
        lines.append("# " + " ".join(f"{k}={v}" for k, v in header.items()))
    width = max(len(r.method) for r in results)
    for r in results:
        ratio = f"{r.median_ms / ref.median_ms:.2f}x" if ref is not None else "n/a (no an)"
        if r.memory_kind == "cuda":
            mem = f"peak {r.memory_mib:.0f} MiB (cuda max_memory_allocated), step +{r.memory_step_mib:.0f} MiB"
        elif r.memory_kind == "cpu-saved":
            mem = f"saved-for-backward {r.memory_step_mib:.1f} MiB (CPU estimate via autograd saved-tensor hooks)"
        else:
            mem = "memory n/a"
        faults = f"  {statistics.median(r.page_faults):7.0f} page faults/step" if r.page_faults else ""
        lines.append(f"{r.method:<{width}}  {r.median_ms:8.2f} ms/step  {r.images_per_s:8.1f} img/s  "
                     f"{ratio:>6} vs an{faults}  {mem}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="an,ignore", help="comma-separated method names (default an,ignore)")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--dataset", default="synthetic", help="dataset whose method_params/train blocks apply")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--amp", choices=["on", "off"], default="off",
                   help="mixed precision: bf16 autocast where supported, fp16 otherwise (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="NHWC model and batches")
    p.add_argument("--weights", default=None, help="trunk weights (none, imagenet, PATH); default: random init")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='extra model arguments, e.g. \'{"layers": [1, 1, 1, 1]}\' for a tiny ResNet')
    p.add_argument("--host-malloc", choices=["cache", "system"], default=None,
                   help="glibc malloc keeps freed memory (cache) or returns it (system); default: params "
                        "train.host_malloc_cache, on")
    p.add_argument("--prepare", default=None, metavar="DATASET",
                   help="benchmark on data from pipeline.bench_prepare.run(DATASET)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        import json

        extra = json.loads(args.model_kwargs) if args.model_kwargs else None
        if extra is not None and not isinstance(extra, dict):
            raise BenchError("--model-kwargs must be a JSON object")
        results = run_bench(methods, args.model, args.image_size, args.batch_size, args.steps, args.warmup,
                            args.device, args.num_classes, args.dataset, args.params, args.seed, args.prepare,
                            threads=args.threads, amp=args.amp == "on", channels_last=args.channels_last,
                            weights=args.weights, model_kwargs=extra, host_malloc=args.host_malloc)
    except json.JSONDecodeError as exc:
        print(f"error: --model-kwargs is not valid JSON ({exc})", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # SpmlError (unknown method/model, bad params) without importing its module early
        if type(exc).__name__ == "SpmlError":
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    print(format_results(results, run_header(results, args.model, args.image_size, args.batch_size, args.steps,
                                             args.device, args.amp == "on", args.channels_last)))
    return 0


def run_header(results: list[BenchResult], model: str, image_size: int, batch_size: int, steps: int, device: str,
               amp: bool, channels_last: bool) -> dict[str, Any]:
    """The settings a bench ran with, for the ``# ...`` line above the results."""
    return {"model": model, "image_size": image_size, "batch": batch_size, "steps": steps,
            "device": _device_name(device), "amp": _amp_name(amp, device), "channels_last": channels_last,
            "host_malloc": results[0].host_malloc if results else "",
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _amp_name(amp: bool, device: str) -> str:
    from pipeline.runtime.optim import amp_dtype

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    dtype = amp_dtype(amp, "auto", dev)
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


def _device_name(device: str) -> str:
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev)).replace(" ", "_")
    return "cpu"


# ------------------------------------------------------------------------- trainings side by side (--parallel)

# The workload of ``spml bench --parallel``: whole tiny trainings, so process start-up, data loading and
# evaluation count as they do in a grid of cells. A bench setting, deep-merged over the given params.yaml.
PARALLEL_WORKLOAD: dict[str, Any] = {
    "data": {"synthetic": {"num_train": 160, "num_test": 40, "image_size": 32, "seed": 0}},
    "train": {"default": {"model": "smallcnn", "epochs": 2, "batch_size": 16, "image_size": 32, "num_workers": 0,
                          "threads": None}},
    "models": {"smallcnn": {"width": 8}},
}


@dataclass
class ParallelResult:
    mode: str  # "one after another" or "side by side"
    wall_s: float
    threads: list[int]  # torch threads each training used (its metrics.json)


def run_parallel_bench(count: int, params_path: Path = Path("params.yaml"), threads: int | None = None,
                       method: str = "an") -> list[ParallelResult]:
    """Wall time of ``count`` tiny trainings one after another (automatic threads), then side by side with
    automatic threads, then side by side with ``threads`` each (default: usable CPUs // count) via $SPML_THREADS.

    Runs ``spml`` as subprocesses in a temporary workspace (tiny synthetic data from :data:`PARALLEL_WORKLOAD`).
    """
    import contextlib
    import json
    import os
    import subprocess
    import tempfile

    from pipeline.config import deep_merge, load_params
    from pipeline.errors import SpmlError
    from pipeline.runtime import host

    if count < 1:
        raise BenchError(f"--parallel {count}: run at least 1 training")
    if threads is not None and threads < 1:
        raise BenchError(f"--threads {threads}: use at least 1 thread")
    import yaml

    try:
        params = deep_merge(load_params(params_path), PARALLEL_WORKLOAD)
    except SpmlError as exc:  # the base params file is missing or invalid
        raise BenchError(str(exc)) from None
    share = threads if threads is not None else max(1, host.usable_cpus() // count)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "SPML_NO_PROGRESS": "1"}
    env.pop(host.THREADS_ENV, None)

    def spml(*args: str, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env={**env, **(extra_env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait(procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            _, stderr = proc.communicate()
            if proc.returncode:
                raise BenchError(f"spml {' '.join(proc.args[3:])} failed: {stderr.strip().splitlines()[-1:]}")

    results = []
    with tempfile.TemporaryDirectory(prefix="spml-bench-parallel-") as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        from stages import download, prepare, sample

        with contextlib.chdir(work):  # the data stages in this process: three fewer interpreter start-ups
            for stage in (download, prepare, sample):
                stage.run("synthetic")
        wait([spml("train", "synthetic", method, "--out", "runs/warm", "--no-resume", cwd=work)])  # builds the cache
        modes = [("one after another", False, None), ("side by side", True, None),
                 ("side by side", True, {host.THREADS_ENV: str(share)})]
        for index, (mode, together, extra_env) in enumerate(modes):
            outs = [f"runs/{index}-{k}" for k in range(count)]
            started = time.perf_counter()
            if together:
                wait([spml("train", "synthetic", method, "--seed", str(k), "--out", out, "--no-resume", cwd=work,
                           extra_env=extra_env) for k, out in enumerate(outs)])
            else:
                for k, out in enumerate(outs):
                    wait([spml("train", "synthetic", method, "--seed", str(k), "--out", out, "--no-resume", cwd=work,
                               extra_env=extra_env)])
            wall = time.perf_counter() - started
            used = [json.loads((work / out / "metrics.json").read_text())["threads"] for out in outs]
            label = f"{mode}, {host.THREADS_ENV}={extra_env[host.THREADS_ENV]}" if extra_env else f"{mode}, auto"
            results.append(ParallelResult(label, wall, used))
    return results


def format_parallel(results: list[ParallelResult], count: int) -> str:
    from pipeline.runtime import host

    epochs = PARALLEL_WORKLOAD["train"]["default"]["epochs"]
    lines = [f"# {count} tiny trainings (spml train, {epochs} epochs); usable CPUs {host.usable_cpus()}"]
    for r in results:
        lines.append(f"{r.mode:<36} wall {r.wall_s:7.2f} s   threads per training {r.threads}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

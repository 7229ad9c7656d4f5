"""GPU smoke test of the training loop's GPU path on a machine with only torch/torchvision/numpy.

Runs ``pipeline.train.train_one_epoch`` and ``predict`` (the functions ``spml train`` uses) on random data
through the real loader (EpochSampler, pinned memory, persistent seeded workers, RandAugment strong view),
for resnet50 + {an, ignore} and q2l + {ignore, plc-lac}, with bf16 and fp16 (GradScaler) autocast,
channels_last and the per-iteration OneCycle schedule; prints losses, step times and checks that
everything is finite. Modules the GPU machine lacks (pyarrow, sklearn, rich) are stubbed: only the
parquet reader, the mAP and the progress bar use them, and this script calls none of those.

    python scripts/gpu_smoke.py [--size 448] [--batch 16] [--steps 4] [--device cuda] [--tiny]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stub_missing(*names: str) -> list[str]:
    stubbed = []
    for name in names:
        try:
            found = importlib.util.find_spec(name.split(".")[0]) is not None
        except ValueError:
            found = True
        if found:
            continue
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: type(attr, (), {})  # any name -> a dummy class
        sys.modules[name] = module
        stubbed.append(name)
    return stubbed


STUBBED = _stub_missing("pyarrow", "pyarrow.parquet", "sklearn", "sklearn.metrics", "rich", "rich.console",
                        "rich.progress")

import torch
from torch.utils.data import DataLoader

from pipeline.contracts import MethodContext
from pipeline.data import EvalSet, Normalizer, TrainSet
from pipeline.methods import build_method
from pipeline.models import build_model
from pipeline.runtime.distributed import EpochSampler
from pipeline.runtime.optim import amp_dtype, build_scheduler
from pipeline.train import Training, predict, train_one_epoch

TINY = {"resnet50": {"layers": [1, 1, 1, 1], "width_per_group": 4},
        "q2l": {"layers": [1, 1, 1, 1], "width_per_group": 4, "hidden_dim": 32, "dim_feedforward": 64}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU dry run)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"stubbed: {STUBBED or 'none'}; torch {torch.__version__}; device "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}", flush=True)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    n, c = args.batch * args.steps, args.classes
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    full = (torch.rand(n, c, generator=g) < 0.15).float()
    full[torch.arange(n), torch.randint(0, c, (n,), generator=g)] = 1
    observed = torch.zeros(n, c)
    observed[torch.arange(n), full.argmax(1)] = 1
    failures = 0
    cases = [("resnet50", "an"), ("resnet50", "ignore"), ("q2l", "ignore"), ("q2l", "plc-lac")]
    for model_name, method_name in cases:
        for amp_name in ("bf16", "fp16"):
            torch.manual_seed(0)
            amp = amp_dtype(True, amp_name, dev)
            train = TrainSet(images, observed, full, strong=True)
            sampler = EpochSampler(n, 0)
            loader = DataLoader(train, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                                pin_memory=dev.type == "cuda", persistent_workers=args.workers > 0,
                                generator=torch.Generator())
            ctx = MethodContext("bench", model_name, c, n, 2, len(loader), float(full.sum(1).mean()),
                                observed.to(dev), dev)
            method = build_method(method_name, {"warmup_epochs": 0} if method_name == "ignore" else {}, ctx)
            model = build_model(model_name, c, **(TINY[model_name] if args.tiny else {}), **method.model_kwargs())
            model = model.to(dev, memory_format=torch.channels_last)
            groups = [gr for gr in model.parameter_groups(1e-5, 10.0) + method.parameter_groups(1e-5)
                      if gr["params"]]
            opt = torch.optim.AdamW(groups, lr=1e-5, weight_decay=1e-2)
            sched = build_scheduler("onecycle", opt, 2, len(loader), 0.2)
            scaler = torch.amp.GradScaler(dev.type) if amp == torch.float16 else None
            norm = Normalizer(dev, channels_last=True)
            training = Training(model=model, method=method, optimizer=opt, scheduler=sched, scaler=scaler, ema=None,
                                amp=amp, max_loss=None)
            times = []
            for epoch in (1, 2):
                sampler.set_epoch(epoch)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                row = train_one_epoch(training, loader, norm, epoch)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / len(loader) * 1000)
            scores, _ = predict(model, method, DataLoader(EvalSet(images, full), batch_size=args.batch),
                                      norm, amp)
            ok = all(torch.isfinite(torch.tensor(v)) for v in row.values()) and bool(
                torch.isfinite(torch.from_numpy(scores)).all()) and scores.shape == (n, c)
            failures += not ok
            logs = " ".join(f"{k}={v:.4g}" for k, v in row.items())
            print(f"{'OK ' if ok else 'BAD'} {model_name:8s} {method_name:8s} amp={str(amp).replace('torch.', '')}"
                  f" lr_end={opt.param_groups[0]['lr']:.3g} ms/step(epoch2, incl. loading)={times[1]:.1f} {logs}",
                  flush=True)
            del model, opt, loader
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print("all OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

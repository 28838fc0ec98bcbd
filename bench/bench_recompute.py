"""What MODEL.ACTIVATION_CHECKPOINTING buys and costs, per model of bench/run_all.py.

    python bench/bench_recompute.py            # CPU, the run_all CPU sizes
    python bench/bench_recompute.py --gpu 0    # the GPU sizes, with peak GPU memory

For each model, with the key off and on: the bytes autograd keeps for the backward pass (counted
exactly through saved-tensor hooks), the median training step (forward, backward, AdamW; the two
variants take turns, so a slow spell of a shared machine hits both), and on a GPU the peak memory
of a step. On a CPU the process's peak RSS moves less than the saved bytes: the recomputation of
the largest block is itself held during its backward, and freed heap memory is kept for reuse.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))
from biapy.config import load_config  # noqa: E402
from biapy.engine.optimizers import AdamW  # noqa: E402
from biapy.models import build_model  # noqa: E402
from biapy.models.layout import apply_layout  # noqa: E402
from biapy.models.recompute import set_recompute  # noqa: E402
from biapy.utils.memory import keep_freed_memory  # noqa: E402
from _cases import CASES, case_config  # noqa: E402


def case_model(name, device):
    sizes = CASES[name]["cpu" if device.type == "cpu" else "gpu"]
    cfg = load_config(case_config(name, sizes, Path("unused"), 1, str(device)))
    torch.manual_seed(0)
    model = apply_layout(build_model(cfg).to(device), cfg)  # channels-last CNNs, as a job runs them
    return model, torch.randn(sizes["batch"], 1, *sizes["patch"], device=device)


def loss_of(model, x):
    out = model(x)
    return (out[0] if isinstance(out, tuple) else out).float().square().mean()


def saved_mb(model, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(model, x)
    return sum(storages.values()) / 2 ** 20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", help="CUDA device index (default: CPU)")
    ap.add_argument("--rounds", type=int, default=5, help="turns per variant (3 steps each)")
    ap.add_argument("--only", nargs="*", choices=list(CASES), help="some models")
    args = ap.parse_args()
    device = torch.device(f"cuda:{args.gpu}" if args.gpu is not None else "cpu")
    keep_freed_memory()  # as the job runner does
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"MODEL.ACTIVATION_CHECKPOINTING off/on, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'model':<26}{'saved MB off':>13}{'on':>8}{'ratio':>7}{'step ms off':>13}{'on':>8}{'ratio':>7}"
          + (f"{'peak MB off':>13}{'on':>8}" if device.type == "cuda" else ""))
    for name in args.only or CASES:
        model, x = case_model(name, device)
        opt = AdamW(model.parameters(), lr=1e-4)
        saved = {on: saved_mb(set_recompute(model, on), x) for on in (False, True)}
        times, peaks = {False: [], True: []}, {}

        def step():
            loss_of(model, x).backward()
            opt.step()
            opt.zero_grad()

        for on in (False, True):  # warm-up, and the peak of one step on a GPU
            set_recompute(model, on)
            step()
            if device.type == "cuda":
                sync()
                torch.cuda.reset_peak_memory_stats(device)
                step()
                sync()
                peaks[on] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        for _ in range(args.rounds):
            for on in (False, True):
                set_recompute(model, on)
                sync()
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                sync()
                times[on].append((time.perf_counter() - t0) / 3 * 1000)
        off_ms, on_ms = statistics.median(times[False]), statistics.median(times[True])
        line = (f"{CASES[name]['title']:<26}{saved[False]:>13.1f}{saved[True]:>8.1f}{saved[True] / saved[False]:>7.2f}"
                f"{off_ms:>13.0f}{on_ms:>8.0f}{on_ms / off_ms:>7.2f}")
        if peaks:
            line += f"{peaks[False]:>13.0f}{peaks[True]:>8.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

"""TRAIN.AMP: which reduced precision training and test inference run in, on this device.

Autocast runs convolutions and matrix products in the reduced type. The layers at the network's ends stay in
float32 (biapy/models/float32.py), so predictions are float32 when they are stitched, scored or written.
"""
import logging
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)


def cpu_has_amx():
    """Whether this CPU multiplies bf16 matrices on AMX tiles (Xeon Sapphire Rapids and later), with the
    kernel's leave to use them. There bf16 autocast took a U-Net's training step 1.6x (2D) to 2.3x (3D) faster
    than float32 (bench/HISTORY.md)."""
    init_amx = getattr(torch._C._cpu, "_init_amx", None)  # torch's own check: CPU flag and kernel permission
    return bool(init_amx and init_amx())


def amd_has_avx512_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this is an AMD CPU with AVX-512 BF16 (Zen 4 and later), as Linux reports it. There bf16 autocast
    took run_all's training steps 1.5x (2D U-Net) to 1.9x (ViT MAE) faster than float32 (bench/README.md); on an
    Intel CPU with AVX-512 BF16 and no AMX it was 1.27x slower, so the flag alone does not decide. False where
    the file is missing (other systems) or unreadable, or hides the flag (a hypervisor that does so also keeps
    the instructions from torch's kernels)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            head = fh.read(1 << 16)  # the first processor's lines; every core reports the same
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in head.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.split() for k, v in fields.items()}
    return fields.get("vendor_id") == ["AuthenticAMD"] and "avx512_bf16" in fields.get("flags", [])


def cpu_prefers_bf16():
    """Whether `TRAIN.AMP auto` trains in bf16 on this CPU: where it was measured faster than float32."""
    return cpu_has_amx() or amd_has_avx512_bf16()


def resolve_amp(setting, device, warn=True):
    """TRAIN.AMP -> (autocast dtype or None, needs a GradScaler). `warn`: say when the setting cannot be had."""
    setting = str(setting).lower()
    if setting == "off":
        return None, False
    if device.type == "cuda":
        # Native bf16 only (compute capability 8.0+): torch's default also counts emulation, which cuDNN's
        # convolutions lack on a T4 or V100.
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if setting == "auto":
            setting = "bf16" if native_bf16 else "fp16"
        elif setting == "bf16" and not native_bf16:
            if warn:
                log.warning("TRAIN.AMP bf16: %s has no native bfloat16 (compute capability below 8.0); training "
                            "in fp16 with loss scaling instead", torch.cuda.get_device_name(device))
            setting = "fp16"
        return (torch.bfloat16, False) if setting == "bf16" else (torch.float16, True)
    if setting == "bf16" or (setting == "auto" and cpu_prefers_bf16()):
        return torch.bfloat16, False
    if setting == "fp16" and warn:
        log.warning("TRAIN.AMP fp16 needs a GPU; training in float32 on %s", device)
    return None, False


def autocast(device, dtype):
    """Autocast to `dtype` on `device`'s type; nothing when `dtype` is None."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype):
    """An autocast dtype (or None) in words: 'bf16 mixed precision', 'fp16 mixed precision' or 'float32'."""
    return {torch.bfloat16: "bf16 mixed precision", torch.float16: "fp16 mixed precision"}.get(dtype, "float32")


def describe_amp(setting, device):
    """What TRAIN.AMP gives on `device`, for the job's start-up line: e.g. 'bf16 mixed precision (TRAIN.AMP auto)'."""
    return f"{precision_name(resolve_amp(setting, device, warn=False)[0])} (TRAIN.AMP {setting})"

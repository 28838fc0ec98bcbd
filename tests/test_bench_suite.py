"""bench/: the suite's case configs (_cases.py) stay valid as the config evolves, its loader timer is exact, bench_recompute.py runs."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from biapy.config import check_config, load_config
from biapy.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name="run_all"):
    """A module of bench/ (run_all.py puts bench/ on sys.path for its own imports, as its siblings do)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
@pytest.mark.parametrize("case", ["2d_crappify", "3d_crappify", "2d_mae", "3d_masked_unet"])
def test_every_case_config_is_valid_and_builds(tmp_path, case, device):
    cases = _bench_module("_cases")
    size = dict(cases.CASES[case]["gpu" if device.startswith("cuda") else "cpu"])
    cfg_dict = cases.case_config(case, size, tmp_path, steps=4, device=device)
    cfg = load_config(cfg_dict)
    check_config(cfg, check_paths=False)
    assert tuple(cfg.DATA.PATCH_SIZE) == tuple(size["patch"]) + (1,)
    assert cfg.DATA.TRAIN.PATCHES_PER_IMAGE * 2 == 4 * size["batch"]  # two training images -> 4 steps
    assert sum(p.numel() for p in build_model(cfg).parameters()) > 0


def test_timed_loader_counts_waiting_and_forwards_the_loader():
    suite = _bench_module()

    class Slow:
        sampler, dataset = "s", "d"

        def __len__(self):
            return 3

        def __iter__(self):
            import time
            for i in range(3):
                time.sleep(0.02)
                yield i

    timed = suite.TimedLoader(Slow())
    assert list(timed) == [0, 1, 2] and len(timed) == 3
    assert (timed.sampler, timed.dataset) == ("s", "d")
    assert 0.05 < timed.wait < 1.0


def test_out_of_core_lines_name_the_peak_and_torch_share_per_build(capsys):
    suite = _bench_module()

    def run(peak, cuda, torch_mb):
        return {"big": {"steps": 8, "size_gb": 4.29, "shape": [2048, 1024, 1024], "rss_mb": peak,
                        "torch_mb": torch_mb, "torch": "2.x", "torch_cuda_build": cuda, "gpu_lib_mb": [140.2, 19.4]},
                "baseline": {"size_gb": 0.008, "rss_mb": peak - 10}}

    suite.print_table([], {"main": run(1250.0, True, 529.4), "other": run(910.0, False, 229.6)}, "cpu", "machine")
    out = capsys.readouterr().out
    assert "peak RSS 1250 MB (target < 1024 MB): MISSED;" in out
    assert "peak RSS 910 MB (target < 1024 MB): ok;" in out
    assert out.index("1250 MB") < out.index("910 MB")  # the running interpreter's line first
    assert "8 MB volume held in memory: 1240 MB" in out and "8 MB volume held in memory: 900 MB" in out
    assert "import torch alone: 529 MB (torch 2.x, a CUDA build" in out
    assert "140 MB of their pages at import, 19 MB left after the job" in out
    assert "import torch alone: 230 MB (torch 2.x, a CPU-only build)" in out
    assert "patch x batch" not in out  # no case rows: no empty table


@pytest.mark.parametrize("extra,says", [(["--only", "ooc", "--torch-python", "{tmp}/nope"], "nope: not an executable"),
                                        (["--skip-ooc", "--torch-python", sys.executable], "leaves out"),
                                        (["--only", "2d_mae", "--torch-python", sys.executable], "leaves out")])
def test_torch_python_is_refused_where_it_cannot_apply(tmp_path, extra, says):
    cmd = [sys.executable, str(ROOT / "bench" / "run_all.py"), *[a.format(tmp=tmp_path) for a in extra]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "--torch-python" in r.stderr and says in r.stderr


def test_run_all_set_overrides_the_cases_config_and_refuses_unknown_keys(tmp_path):
    script = str(ROOT / "bench" / "run_all.py")
    r = subprocess.run([sys.executable, script, "--set", "TRAIN.COMPILEX=1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "unknown key 'TRAIN.COMPILEX'; did you mean TRAIN.COMPILE?" in r.stderr
    r = subprocess.run([sys.executable, script, "--set", "TRAIN.COMPILE=maybe"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)  # a value of the wrong type ends here too, before any case runs
    assert r.returncode == 2 and "TRAIN.COMPILE: expected a boolean, got 'maybe'" in r.stderr
    # The override wins over what the script sets itself (--workers 0 here): the case reports 1 worker.
    r = subprocess.run([sys.executable, script, "--quick", "--only", "2d_crappify", "--workers", "0", "--set",
                        "SYSTEM.NUM_WORKERS=1", "--workdir", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Loader workers: 1 " in r.stdout and "Config overrides: SYSTEM.NUM_WORKERS=1" in r.stdout


def test_run_all_times_the_masking_cases_end_to_end(tmp_path):
    """Their bare forward passes call predict_batch after a whole image was predicted: that had raised
    StopIteration (the image's patch grid was still taken as the source of later patches)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", "2d_mae",
                        "3d_masked_unet", "--workdir", str(tmp_path / "new"), "--set", "TRAIN.AMP=bf16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "Failed to run" not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    for case in ("2D ViT MAE", "3D masked U-Net"):
        row = next(line for line in r.stdout.splitlines() if line.startswith(case)).split()
        assert "x" in row and float(row[-1]) > 0  # patch x batch ... peak RSS MB
    # The MAE ratio in the run's precision and, as that is reduced, in float32 too.
    assert "Precision: bf16 mixed precision (TRAIN.AMP bf16)" in r.stdout
    for precision in ("bf16 mixed precision", "float32"):
        assert re.search(rf"mask ratio 0.75 vs 0, {precision}: [\d.]+ / [\d.]+ ms = [\d.]+ ", r.stdout), precision


@pytest.mark.parametrize("peer,says", [("{tmp}/nope", "nope: not an executable"), (sys.executable, "expected '3.7.1'"),
                                       ("venv/python", "expected '3.7.1'")])  # relative, as a venv's symlink
def test_compare_biapy_refuses_a_peer_python_without_biapy_3_7_1(tmp_path, peer, says):
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "python").symlink_to(sys.executable)
    cmd = [sys.executable, str(ROOT / "bench" / "compare_biapy.py"), "--peer-python", peer.format(tmp=tmp_path),
           "--workdir", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--peer-python" in r.stderr and says in r.stderr
    assert not (tmp_path / "work").exists()  # refused before any data is made


def test_recompute_bench_prints_the_saved_share_and_step_ratio():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_recompute.py"), "--only", "2d_mae",
                          "--rounds", "1"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    row = next(line for line in out.splitlines() if line.startswith("2D ViT MAE")).split()
    saved_off, saved_on, saved_ratio, step_ratio = float(row[3]), float(row[4]), float(row[5]), float(row[8])
    assert saved_on < saved_off and saved_ratio == pytest.approx(saved_on / saved_off, abs=0.01)
    assert saved_ratio < 0.3 and step_ratio > 0


def test_test_memory_bench_prints_a_row_per_depth_and_the_cost_per_voxel():
    """It wraps Workflow.test, whose signature had moved on under it (a TypeError on every run)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_test_memory.py"), "--depths", "8", "16"],
                         capture_output=True, text=True, check=True, cwd=ROOT, timeout=300).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["crappify"], ["masking"])]
    assert [(r[0], r[1]) for r in rows if "x256x256" in r[1]] == [
        ("crappify", "8x256x256"), ("crappify", "16x256x256"), ("masking", "8x256x256"), ("masking", "16x256x256")]
    per_voxel = [float(line.split()[1]) for line in out.splitlines() if "bytes per extra test voxel" in line]
    assert len(per_voxel) == 2 and all(v > 0 for v in per_voxel)


def test_mae_profile_prints_both_ratios_and_the_operator_table():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_mae.py"), "--batch", "2", "--steps", "1",
                          "--rows", "2", "--amp", "off"], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=300).stdout
    assert re.search(r"^2D ViT MAE, \(128, 128\) x 2, cpu, .*, float32$", out, re.M)  # the precision it ran in
    walls = {float(m[0]): float(m[1]) for m in re.findall(r"mask ratio ([\d.]+): wall ([\d.]+) ms/step", out)}
    assert set(walls) == {0.75, 0.0} and all(w > 0 for w in walls.values())
    ratio = float(re.search(r"wall ratio 0.75 / 0: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(walls[0.75] / walls[0.0], abs=0.01)
    assert "aten::" in out  # the operator table


def test_mae_profile_through_the_trainer_times_both_paths_fresh_and_after_real_epochs():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_mae.py"), "--trainer", "--batch", "2",
                          "--steps", "1"], capture_output=True, text=True, check=True, cwd=ROOT, timeout=300).stdout
    rows = re.findall(r"^(fresh|after two real epochs): ratio 0.75: alone ([\d.]+), through the trainer ([\d.]+); "
                      r"ratio 0.0: alone ([\d.]+), through the trainer ([\d.]+) ms/step$", out, re.M)
    assert [r[0] for r in rows] == ["fresh", "after two real epochs"]
    assert all(float(v) > 0 for r in rows for v in r[1:])
    assert float(re.search(r"second real epoch \(mask ratio 0.75\): ([\d.]+) ms/step", out).group(1)) > 0


def test_machine_line_names_the_malloc_settings_the_jobs_keep(monkeypatch):
    suite = _bench_module()
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert "MALLOC_" not in suite.machine("cpu")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "8388608")
    assert ", MALLOC_MMAP_THRESHOLD_=8388608" in suite.machine("cpu")


@pytest.mark.parametrize("overrides, ours", [({"TRAIN.AMP": "off"}, "float32 (TRAIN.AMP off)"),
                                             ({"TRAIN.AMP": False}, "float32 (TRAIN.AMP off)"),  # --set TRAIN.AMP=off
                                             ({"TRAIN.AMP": True}, "(TRAIN.AMP auto)"),
                                             ({"TRAIN.AMP": "bf16"}, "bf16 mixed precision (TRAIN.AMP bf16)")])
def test_compare_biapy_says_which_precision_each_tool_ran_in(capsys, overrides, ours):
    spec = importlib.util.spec_from_file_location("compare_biapy", ROOT / "bench" / "compare_biapy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.report([], [5], False, overrides)
    said = re.search(r"Precision: ours (.*); BiaPy 3.7.1 float32 \(it has no mixed-precision option\)",
                     capsys.readouterr().out)
    assert said and said.group(1).endswith(ours)  # 'auto' names what it gives on this machine

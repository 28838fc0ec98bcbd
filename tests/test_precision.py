"""TRAIN.AMP: which reduced precision a device gets."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.mark.parametrize("native, setting, expected", [(False, "auto", (torch.float16, True)),
                                                       (False, "bf16", (torch.float16, True)),
                                                       (True, "auto", (torch.bfloat16, False)),
                                                       (True, "fp16", (torch.float16, True))])
def test_amp_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch, caplog, native, setting, expected):
    """torch's is_bf16_supported() also counts emulation, true on a T4, whose cuDNN convolutions lack bf16."""
    from biapy.engine.precision import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with caplog.at_level("WARNING"):
        assert resolve_amp(setting, torch.device("cuda:0")) == expected
    assert ("Tesla T4 has no native bfloat16" in caplog.text) == (setting == "bf16" and not native)


@pytest.mark.parametrize("fast, setting, expected", [(True, "auto", torch.bfloat16), (False, "auto", None),
                                                     (False, "bf16", torch.bfloat16), (True, "off", None),
                                                     (True, "fp16", None)])
def test_amp_on_a_cpu_takes_bf16_where_it_is_faster_or_when_asked(monkeypatch, caplog, fast, setting, expected):
    """bf16 autocast is 1.5-2.3x faster than float32 on AMX tiles and on AMD's AVX-512 BF16, 1.27x slower on
    Intel's AVX-512 BF16 alone."""
    from biapy.engine.precision import resolve_amp

    monkeypatch.setattr("biapy.engine.precision.cpu_prefers_bf16", lambda: fast)
    with caplog.at_level("WARNING"):
        assert resolve_amp(setting, torch.device("cpu")) == (expected, False)
        assert resolve_amp(setting, torch.device("cpu"), warn=False) == (expected, False)
    assert caplog.text.count("TRAIN.AMP fp16 needs a GPU") == (setting == "fp16")  # once: not when warn=False


ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu\n")


@pytest.mark.parametrize("text, expected", [
    (ZEN4, True),
    (ZEN4.replace(" avx512_bf16", "", 1), False),  # Zen 3, or a hypervisor hiding the flag
    (ZEN4.replace("AuthenticAMD", "GenuineIntel", 1), False),  # Intel's AVX-512 BF16 without AMX: slower in bf16
    (ZEN4.replace("avx512_bf16", "avx512_bf16x", 1), False),  # a whole flag, not a prefix
    ("", False)])
def test_amd_avx512_bf16_is_read_from_the_first_processors_vendor_and_flags(tmp_path, text, expected):
    from biapy.engine.precision import amd_has_avx512_bf16

    (tmp_path / "cpuinfo").write_text(text)
    assert amd_has_avx512_bf16(tmp_path / "cpuinfo") is expected
    assert amd_has_avx512_bf16(tmp_path / "missing") is False  # macOS, Windows


@pytest.mark.parametrize("amx, amd, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_auto_takes_bf16_on_amx_or_on_amd_with_avx512_bf16(monkeypatch, amx, amd, expected):
    from biapy.engine.precision import resolve_amp

    monkeypatch.setattr("biapy.engine.precision.cpu_has_amx", lambda: amx)
    monkeypatch.setattr("biapy.engine.precision.amd_has_avx512_bf16", lambda: amd)
    assert resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16 if expected else None, False)

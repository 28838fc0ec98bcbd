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


@pytest.mark.parametrize("amx, setting, expected", [(True, "auto", torch.bfloat16), (False, "auto", None),
                                                    (False, "bf16", torch.bfloat16), (True, "off", None),
                                                    (True, "fp16", None)])
def test_amp_on_a_cpu_takes_bf16_where_it_has_amx_or_when_asked(monkeypatch, caplog, amx, setting, expected):
    """bf16 autocast is 1.6-2.3x faster than float32 on AMX tiles, 1.27x slower with AVX-512 BF16 alone."""
    from biapy.engine.precision import resolve_amp

    monkeypatch.setattr("biapy.engine.precision.cpu_has_amx", lambda: amx)
    with caplog.at_level("WARNING"):
        assert resolve_amp(setting, torch.device("cpu")) == (expected, False)
        assert resolve_amp(setting, torch.device("cpu"), warn=False) == (expected, False)
    assert caplog.text.count("TRAIN.AMP fp16 needs a GPU") == (setting == "fp16")  # once: not when warn=False

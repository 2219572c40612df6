"""The torch device policy without a GPU: CUDA's presence, count, capability and name are faked."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llmos.config import Settings
from llmos.engine import torch_device
from llmos.errors import BackendUnavailableError
from llmos.runtime import doctor
from llmos.training.loop import resolve_precision
from llmos.types import SamplingParams


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int = 1, major: int = 9) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    properties = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 1024**3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)


def test_auto_is_the_cpu_without_cuda_and_float32_there(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=0)
    device = torch_device.resolve_device("auto")
    assert device == torch.device("cpu")
    assert torch_device.resolve_dtype("auto", device) is torch.float32
    assert torch_device.resolve_device(None) == torch.device("cpu")
    assert torch_device.describe_device(device) == "cpu"
    assert torch_device.training_precision(device) is None
    assert torch_device.training_precision(None) is None


def test_asking_for_cuda_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=0)
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(BackendUnavailableError, match="no CUDA device is visible"):
            torch_device.resolve_device(spec)
    assert torch_device.resolve_device("cpu") == torch.device("cpu")


def test_auto_picks_the_first_gpu_with_bf16_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=2, major=8)
    device = torch_device.resolve_device("auto")
    assert device == torch.device("cuda", 0)
    assert torch_device.resolve_device("cuda") == torch.device("cuda", 0)
    assert torch_device.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(BackendUnavailableError, match="only 2 CUDA device"):
        torch_device.resolve_device("cuda:2")
    assert torch_device.resolve_dtype("auto", device) is torch.bfloat16
    assert torch_device.training_precision(device) == "bf16"
    assert torch_device.describe_device(device) == "cuda:0 NVIDIA H100 80GB HBM3, 80 GiB"
    assert resolve_precision("auto", device) == ("bf16", torch.bfloat16)
    assert resolve_precision("fp32", device) == ("fp32", torch.float32)


def test_older_gpus_get_fp16_for_inference_and_fp32_for_training(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=1, major=7)
    device = torch_device.resolve_device("auto")
    assert torch_device.resolve_dtype("auto", device) is torch.float16
    assert resolve_precision("auto", device) == ("fp32", torch.float32)


def test_an_explicit_dtype_wins_and_a_torch_device_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, count=1)
    cuda = torch.device("cuda", 0)
    assert torch_device.resolve_dtype("float32", cuda) is torch.float32
    assert torch_device.resolve_dtype("float16", cuda) is torch.float16
    assert torch_device.resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert torch_device.resolve_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert torch_device.resolve_device("cpu") == torch.device("cpu")  # forcing the CPU with a GPU present
    with pytest.raises(ValueError, match="dtype"):
        torch_device.resolve_dtype("int8", cuda)


@pytest.mark.parametrize(
    ("spec", "gpus", "workers", "expected"),
    [("auto", 0, 2, False), ("auto", 1, 2, False), ("auto", 2, 2, True), ("cpu", 4, 2, False), ("cuda", 2, 2, True)],
)
def test_ray_workers_take_a_gpu_each_only_when_there_are_enough(
    spec: str, gpus: float, workers: int, expected: bool
) -> None:
    assert torch_device.ray_use_gpu(spec, gpus, workers) is expected


def test_ray_with_cuda_forced_and_too_few_gpus_is_refused() -> None:
    with pytest.raises(BackendUnavailableError, match="1 GPU"):
        torch_device.ray_use_gpu("cuda", 1, 2)


def test_settings_validate_the_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().torch_device == "auto" and Settings().torch_dtype == "auto"
    monkeypatch.setenv("LLMOS_TORCH_DEVICE", "CUDA:1")
    monkeypatch.setenv("LLMOS_TORCH_DTYPE", "Float16")
    assert Settings().torch_device == "cuda:1" and Settings().torch_dtype == "float16"
    for field, bad in (("torch_device", "gpu"), ("torch_device", "cuda:x"), ("torch_dtype", "fp8")):
        with pytest.raises(ValueError, match=field):
            Settings(**{field: bad})


def test_doctor_reports_the_cpu_of_a_cpu_build_without_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_child(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("a CPU-only build needs no child process")

    monkeypatch.setattr(torch_device, "describe_in_child", no_child)
    cpu_build = {"installed": True, "version": "2.13.0", "cuda": None}
    assert doctor.torch_device_report(Settings(), cpu_build) == "cpu"
    assert doctor.torch_device_report(Settings(torch_device="cpu"), {**cpu_build, "cuda": "12.8"}) == "cpu"
    assert doctor.torch_device_report(Settings(), {"installed": False}) is None


def test_doctor_asks_a_child_about_cuda_and_says_why_it_is_unavailable() -> None:
    # this machine's torch sees no GPU: forcing CUDA is reported, not raised
    torch_device.describe_in_child.cache_clear()
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    answer = doctor.torch_device_report(Settings(torch_device="cuda"), {"installed": True, "cuda": None})
    assert answer is not None and answer.startswith("unavailable: ") and "no CUDA device" in answer
    checks = {c.name: c for c in doctor._checks(_report_with(answer))}
    assert checks["torch"].status == "warn" and "device unavailable" in checks["torch"].detail


def _report_with(device: str) -> dict[str, Any]:
    return {
        "llama_cpp": {"installed": False},
        "torch": {"installed": True, "version": "2.13.0", "cuda": None},
        "torch_device": device,
        "resources": {"memory_available_bytes": None, "disk_free_bytes": 10 * 1024**3},
        "registry": {"ok": True, "models": 0, "blobs": 0},
    }


def test_the_torch_backend_refuses_a_cuda_setting_without_a_gpu(tmp_path: Any) -> None:
    from llmos.engine.backends.torch import TorchBackend

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(BackendUnavailableError, match="LLMOS_TORCH_DEVICE=cpu"):
        TorchBackend(tmp_path, device="cuda")


def test_the_backend_keeps_every_tensor_on_its_device(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the meta device (no data, but mixing it with CPU tensors in arithmetic raises) a decode step with prefills,
    batched decodes, LoRA rows and spans runs through; only the logits leave the device (one copy per step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmos.engine.backends.base import BatchItem
    from llmos.engine.backends.torch import TorchBackend
    from tests.helpers import make_tiny_bpe_llama

    model_dir = make_tiny_bpe_llama(tmp_path / "model")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(tmp_path / "adapter")
    meta = torch.device("meta")
    backend = TorchBackend(model_dir, device=meta, dtype=torch.float32, n_seq_max=4, n_ctx_seq=64)
    backend.add_adapter("a", tmp_path / "adapter")
    assert backend.k_cache.is_meta and all(p.is_meta for p in backend.model.parameters())
    assert all(t.is_meta for pair in backend.adapters["a"].weights.values() for t in pair)
    copies = []
    real_cpu = torch.Tensor.cpu

    def cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.is_meta:
            copies.append(tuple(self.shape))
            return torch.zeros(self.shape, dtype=self.dtype)
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    backend.bind_adapter(1, "a")
    assert backend.decode([BatchItem(0, [1, 2, 3], 0), BatchItem(1, [4, 5], 0)]) == {0: [0], 1: [1]}
    assert backend.decode([BatchItem(0, [6], 3), BatchItem(1, [7], 2)]) == {0: [0], 1: [1]}
    assert backend.decode([BatchItem(0, [8, 9], 4, logits="all")]) == {0: [0, 1]}
    backend.save_span(0, 0, 0, 4)
    backend.load_span(0, 2, 0, 4)
    assert backend.decode([BatchItem(2, [1], 4)]) == {2: [0]}
    assert copies == [(2, backend.n_vocab), (2, backend.n_vocab), (2, backend.n_vocab), (1, backend.n_vocab)]
    assert isinstance(backend.new_sampler(SamplingParams(temperature=0)).sample(0), int)

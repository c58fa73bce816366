"""Weight bytes as stored and peak memory of one forward pass.

Weight bytes (``weight_bytes``) are exact: the bytes of every tensor in ``model.state_dict()``, i.e. what
a checkpoint holds, with each shared tensor (tied embedding / lm_head, ...) counted once. This covers
plain float weights, torch quantized tensors (integer data plus their scales and zero points) and
bitsandbytes layers, whose state_dict already carries every stored piece: Linear8bitLt's int8 weight,
``SCB`` and ``weight_format``; Linear4bit's packed uint8 weight, ``absmax``, ``quant_map``, ``nested_*``
and the JSON-serialised quant_state tensor. transformers' ``get_memory_footprint()`` is not used: it
counts parameters and buffers only, missing e.g. the quantization statistics.

Extension hook for packed layers: a module that defines ``stored_weight_bytes(self) -> int`` is trusted
for its whole subtree. That number is counted once per module object (under ``by_dtype`` key
``"stored_weight_bytes"``) and none of the state_dict entries under that module's prefix are counted
(they are not included in ``num_tensors`` either).

Peak memory (``peak_forward_memory``) runs one warm-up forward, then measures a second, identical one,
so one-off lazy allocations (kernel caches, thread pools) are not charged to the model. The forward is
an evaluation pass: ``use_cache=False`` and logits for every position. Methods:

* ``"cuda_max_allocated"`` on CUDA: the caching allocator's peak, reset just before the forward.
* ``"rss_hwm"`` on Linux: the kernel's resident-set high-water mark, reset by writing ``5`` to
  ``/proc/self/clear_refs`` and read from ``VmHWM`` in ``/proc/self/status``.
* ``"rss_sampling"`` elsewhere: RSS polled by a background thread about every millisecond (can miss
  very short spikes).

On CPU, memory freed by the warm-up is first handed back to the OS (glibc ``malloc_trim``); otherwise
the allocator would serve the measured forward from pages it still holds and the increase would read 0.
"""
from __future__ import annotations

import ctypes
import gc
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import psutil
import torch

from evaluators.runtime import check_context, inference_eval, model_device, random_prompt, require_int

HOOK = "stored_weight_bytes"
RSS_HWM = "rss_hwm"
RSS_SAMPLING = "rss_sampling"
CUDA_MAX_ALLOCATED = "cuda_max_allocated"
PEAK_METHODS = (RSS_HWM, RSS_SAMPLING, CUDA_MAX_ALLOCATED)

# ---------------------------------------------------------------------------------------------------
# Weight bytes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightMemory:
    total_bytes: int
    by_dtype: dict[str, int]
    num_tensors: int
    method: str = "state_dict_storage"

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "by_dtype": dict(self.by_dtype),
            "num_tensors": self.num_tensors,
            "method": self.method,
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Tensors in a state_dict value; torch.ao packed params are (weight, bias) tuples, dtypes are skipped."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _identity(t: torch.Tensor) -> tuple:
    """Equal for two names of the same stored data (tied weights), different otherwise."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = 0
    if ptr == 0:  # meta/fake tensors share address 0: only object identity tells them apart
        return ("object", id(t))
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def tensor_bytes(t: torch.Tensor) -> int:
    """Stored bytes of one tensor; quantized tensors include their quantization parameters."""
    if not t.is_quantized:
        if t.layout != torch.strided:
            raise ValueError(f"cannot size a {t.layout} tensor; only dense and quantized tensors are supported")
        return t.numel() * t.element_size()
    data = t.int_repr()
    nbytes = data.numel() * data.element_size()
    scheme = t.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        # torch keeps (and torch.save writes) a per-tensor scale as a double and the zero point as int64.
        return nbytes + 8 + 8
    if scheme in (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams):
        scales, zero_points = t.q_per_channel_scales(), t.q_per_channel_zero_points()
        return nbytes + scales.numel() * scales.element_size() + zero_points.numel() * zero_points.element_size()
    raise ValueError(f"unsupported quantization scheme {scheme}")


def _under(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def _hooked_modules(model: torch.nn.Module) -> tuple[list[str], dict[int, int]]:
    """Prefixes of modules that size themselves, and their byte counts by module id (shared modules once)."""
    prefixes: list[str] = []
    sizes: dict[int, int] = {}
    # remove_duplicate=False: a module reused at two paths appears in the state_dict under both.
    for name, module in model.named_modules(remove_duplicate=False):
        if any(_under(name, p) for p in prefixes) or not callable(getattr(module, HOOK, None)):
            continue  # the outermost self-sizing module already accounts for everything below it
        prefixes.append(name)
        if id(module) not in sizes:
            size = getattr(module, HOOK)()
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"{type(module).__name__}.{HOOK}() must return an int >= 0, got {size!r}")
            sizes[id(module)] = size
    return prefixes, sizes


def weight_bytes(model: torch.nn.Module) -> WeightMemory:
    """Exact bytes of the model's weights as a checkpoint stores them (see module docstring)."""
    prefixes, hooked = _hooked_modules(model)
    by_dtype: dict[str, int] = {}
    if hooked:
        by_dtype[HOOK] = sum(hooked.values())
    seen: set[tuple] = set()
    # Keep the state_dict alive while walking it: some values (unpacked int8 weights, bnb quant_state
    # tensors) are built on the fly, and a freed one's address could be reused and look like a duplicate.
    state = model.state_dict(keep_vars=True)
    for key, value in state.items():
        if any(_under(key, p) for p in prefixes):
            continue
        for t in _tensors(value):
            identity = _identity(t)
            if identity in seen:
                continue
            seen.add(identity)
            name = dtype_name(t.dtype)
            by_dtype[name] = by_dtype.get(name, 0) + tensor_bytes(t)
    return WeightMemory(total_bytes=sum(by_dtype.values()), by_dtype=by_dtype, num_tensors=len(seen))


# ---------------------------------------------------------------------------------------------------
# Peak memory of one forward
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakMemory:
    device: str
    method: str
    prompt_tokens: int
    before_bytes: int
    peak_bytes: int
    increase_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "method": self.method,
            "prompt_tokens": self.prompt_tokens,
            "before_bytes": self.before_bytes,
            "peak_bytes": self.peak_bytes,
            "increase_bytes": self.increase_bytes,
        }


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{field} not in /proc/self/status")


def _reset_rss_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is unavailable or refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Python's garbage collected, then the C heap's free pages handed back to the kernel: glibc keeps the pages of
    freed tensors and arrays mapped for reuse, and they count as resident until trimmed."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):
        pass  # not glibc: the measured increase may be understated by memory the allocator kept


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float = 0.001) -> None:
        super().__init__(daemon=True)
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self.peak = self._process.memory_info().rss

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self._process.memory_info().rss)


def _cpu_peak(forward: Callable[[], Any]) -> tuple[str, int, int]:
    release_freed_memory()
    if _reset_rss_hwm():
        before = _status_bytes("VmRSS")
        forward()
        return RSS_HWM, before, max(_status_bytes("VmHWM"), before)
    before = psutil.Process().memory_info().rss
    sampler = _RssSampler()
    sampler.start()
    try:
        forward()
    finally:
        peak = sampler.stop()
    return RSS_SAMPLING, before, max(peak, before)


def _cuda_peak(forward: Callable[[], Any], device: torch.device) -> tuple[str, int, int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    forward()
    torch.cuda.synchronize(device)
    return CUDA_MAX_ALLOCATED, before, torch.cuda.max_memory_allocated(device)


def peak_forward_memory(model: torch.nn.Module, prompt_tokens: int = 128, seed: int = 0) -> PeakMemory:
    """Peak memory of one evaluation forward of a random ``prompt_tokens``-token prompt."""
    require_int("prompt_tokens", prompt_tokens, 1)
    require_int("seed", seed, 0)
    device = model_device(model)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"peak memory can be measured on cpu or cuda, not {device.type}")
    check_context(model, prompt_tokens)
    prompt = random_prompt(model, prompt_tokens, seed)

    def forward() -> None:
        model(input_ids=prompt, use_cache=False)  # result dropped at once, as an evaluation loop would

    with inference_eval(model):
        forward()  # warm-up: lazy one-off allocations are not this forward's cost
        if device.type == "cuda":
            method, before, peak = _cuda_peak(forward, device)
        else:
            method, before, peak = _cpu_peak(forward)
    return PeakMemory(
        device=str(device),
        method=method,
        prompt_tokens=prompt_tokens,
        before_bytes=before,
        peak_bytes=peak,
        increase_bytes=peak - before,
    )


# ---------------------------------------------------------------------------------------------------
# Both together
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryResult:
    weights: WeightMemory
    peak: PeakMemory

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.to_dict(), "peak": self.peak.to_dict()}


def measure_memory(model: torch.nn.Module, prompt_tokens: int = 128, seed: int = 0) -> MemoryResult:
    """Stored weight bytes plus the peak memory of one forward of a ``prompt_tokens`` prompt."""
    return MemoryResult(weights=weight_bytes(model), peak=peak_forward_memory(model, prompt_tokens, seed))

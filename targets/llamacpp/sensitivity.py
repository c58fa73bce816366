"""How much each tensor of a model loses in each llama.cpp type: the table a per-tensor allocation chooses from.

Two measurements, both on the candidate actually quantized (a pruned model or a student has its own):
- `type_options`: every quantizable tensor stored in every type of a menu by llama.cpp's own quantizer
  (`ggml_quants`: the same C function llama-quantize calls, with the importance matrix) and read back; its
  error is the importance-weighted squared rounding error ``sum_rows sum_j imatrix_j (w_ij - q_ij)^2``, the
  expected squared error of that projection's output under the calibration text's mean squared activations
  (what llama.cpp's quantizer itself minimises, and what llama.cpp PR #15550's --target-bpw allocates on).
  A type whose blocks do not fit a row width is sized and scored as the type llama.cpp writes instead.
- `kl_gains`: that error is not comparable across tensors (an error in a value projection and the same in
  a gate projection move the output distribution by different amounts), so each role (attn_v, ffn_down, ...)
  in each band of layers is quantized in a probe type, in torch, the rest of the model left in float, and the
  KL divergence of the model's next-token distribution from the float model's is measured on calibration
  windows: gain = KL / error (about 30 passes, whatever the depth, each from its group's first layer on). The allocation then minimises the
  predicted KL ``sum gain_t * error_t(type_t)``, assuming the tensors' contributions add up (the benchmark
  compares predicted and measured KL).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.compute import float32_compute
from search_spaces.layers import decoder_layers
from search_spaces.quantization.allocation import Option
from targets.llamacpp import compensated, ggml_quants
from targets.llamacpp.imatrix import gguf_linear_names, input_covariance_chunks
from targets.llamacpp.quantize import fallback_type, quant_type, type_bytes

# Types a dense decoder's allocation chooses from, per family (search_spaces' ALLOCATION_TYPES): 2 to 8 bits.
# Left out: the 1-2 bit IQ types (for models trained for them; seconds per tensor to quantize) and IQ3_S
# (slow to quantize, and no better than Q3_K per byte on the built-in model).
MENUS = {
    "all": ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0"),
    "legacy": ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    "k": ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"),
}
PROBE = "Q4_0"  # every row width the planner quantizes is a multiple of 32: the probe never falls back
BUCKETS = 4  # bands of layers whose tensors of one role share a measured KL gain (4 x 7 roles + 2 forwards)
ROWS = 128  # rows per tensor on which each type's error is measured (a vocabulary embedding has 49k-128k)
# A compensated option's ratio to llama.cpp's rounding costs rows x width^2 per type (the column loop's updates
# and both output errors under the full covariance): on 128 rows a 1B model's 8192-wide MLP down projection cost
# 16x a 2048-wide one. The ratio is measured on a subset of the sampled rows holding at least as many weights as
# 128 rows of the built-in model's widest (1536), and at least 32 rows: 96 rows of 2048, 32 of 8192 (the built-in
# model's tensors keep all 128); the error it scales is still the one of all sampled rows (`type_options`').
COMPENSATED_WEIGHTS = ROWS * 1536
COMPENSATED_LEAST_ROWS = 32


def compensated_rows(width: int) -> int:
    """On how many of a `width`-wide tensor's sampled rows its compensated options' ratio is measured."""
    return max(COMPENSATED_LEAST_ROWS, min(ROWS, -(-COMPENSATED_WEIGHTS // width)))


@dataclass(frozen=True)
class Tensor:
    """One weight llama.cpp quantizes: its GGUF name, the module(s) holding it, and its importance values."""

    gguf_name: str
    modules: tuple[str, ...]  # a tied embedding: the head and the input embedding share it
    importance: np.ndarray | None  # mean squared input activation per column; None weighs columns equally
    shape: tuple[int, int]  # (rows, row width) as torch holds the weight

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def quantizable(model: nn.Module, imatrix: Mapping[str, np.ndarray]) -> list[Tensor]:
    """The weights llama.cpp quantizes in the candidate's GGUF: the decoder blocks' linear layers, the LM head
    (`output.weight`) and the token embedding (`token_embd.weight`, in place and still shared when tied)."""
    names = gguf_linear_names(model, head=True)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    modules = dict(model.named_modules())
    embed_name = next(n for n, m in modules.items() if m is embedding)

    def tensor(gguf_name: str, held_by: tuple[str, ...], importance) -> Tensor:
        return Tensor(gguf_name, held_by, importance, tuple(modules[held_by[0]].weight.shape))

    tensors = []
    for module_name, gguf_name in names.items():
        if gguf_name == "token_embd.weight":  # the tied head: one tensor, used by both
            tensors.append(tensor(gguf_name, (embed_name, module_name), imatrix.get(gguf_name)))
        else:
            tensors.append(tensor(gguf_name, (module_name,), imatrix.get(gguf_name)))
    if head is None or "token_embd.weight" not in names.values():  # untied: the embedding on its own
        tensors.append(tensor("token_embd.weight", (embed_name,), None))
    return tensors


def weights_of(model: nn.Module, tensors: Sequence[Tensor]) -> dict[str, torch.Tensor]:
    """{GGUF name: the model's weight parameter} of `tensors`."""
    modules = dict(model.named_modules())
    return {t.gguf_name: modules[t.modules[0]].weight for t in tensors}


def _error(weight: np.ndarray, restored: np.ndarray, importance: np.ndarray | None) -> float:
    squared = np.square(weight.astype(np.float64) - restored).sum(axis=0)
    return float(squared @ importance if importance is not None else squared.sum())


def sampled_rows(rows: int, most: int) -> np.ndarray:
    """Evenly spaced row indices, at most `most` of them (all rows when there are fewer)."""
    return np.arange(rows) if rows <= most else np.linspace(0, rows - 1, most).round().astype(int)


def _sampled(model: nn.Module, tensors: Sequence[Tensor], rows: int):
    """(tensor, `rows` evenly spaced rows of its weight as float32, rows of the whole per sampled row)."""
    weights = weights_of(model, tensors)
    for tensor in tensors:
        full = weights[tensor.gguf_name].detach()
        picked = sampled_rows(full.shape[0], rows)
        yield tensor, full[torch.from_numpy(picked)].float().cpu().numpy(), full.shape[0] / len(picked)


def type_options(model: nn.Module, tensors: Sequence[Tensor], menu: Sequence[str], rows: int = ROWS,
                 threads: int | None = None) -> dict[str, list[Option]]:
    """{GGUF name: [Option(type written, exact bytes, importance-weighted squared error)]}; a type falling back
    on a row width appears as the type written (once). Each type quantizes rows independently, so the error is
    measured on `rows` evenly spaced rows and scaled to the whole tensor (seconds instead of minutes)."""
    table = {}
    for tensor, weight, scale in _sampled(model, tensors, rows):
        options = []
        for kind in dict.fromkeys(fallback_type(kind, weight.shape[1]) for kind in menu):
            stored = type_bytes(kind, tensor.shape)
            if not quant_type(kind).quantized:
                options.append(Option(kind, stored, 0.0))
                continue
            restored, _ = ggml_quants.roundtrip(kind, weight, tensor.importance, threads)
            options.append(Option(kind, stored, scale * _error(weight, restored, tensor.importance)))
        table[tensor.gguf_name] = options
    return table


def compensated_options(model: nn.Module, tensors: Sequence[Tensor], menu: Sequence[str],
                        covariances: Mapping[str, np.ndarray], rows: int = ROWS,
                        ratio_rows: Callable[[int], int] = compensated_rows, threads: int | None = None,
                        store: "compensated.FactorStore | None" = None) -> dict[str, list[Option]]:
    """{GGUF name: [Option(``<type>+gptq``, exact bytes, error)]} for each type of `menu` (as written on the row
    width) that error-compensated rounding writes (compensated.py), for the tensors `covariances` has (their
    inputs' mean x x^T). The error is llama.cpp's rounding's importance-weighted error (`type_options`) scaled by
    the ratio of the two roundings' output errors under the full covariance: the importance-weighted error is its
    diagonal part only, and the compensation is exactly what moves error off the diagonal. Rows are rounded
    independently here too, so the sampled rows are those of the whole tensor's rounding; the ratio is measured
    on `ratio_rows(width)` of them, evenly spaced. `threads` tensors are
    rounded at once, one decoder block at a time (`compensated.layer_by_layer`: the Hessian factors of one block's
    inputs held at once). `store`: where each tensor's factor is kept for the whole-tensor rounding of the trials."""
    factors = compensated.FactorCache()  # tensors reading one input share its covariance, and so its factor
    work = []
    for tensor, weight, scale in _sampled(model, [t for t in tensors if t.gguf_name in covariances], rows):
        kinds = [k for k in dict.fromkeys(fallback_type(k, weight.shape[1]) for k in menu)
                 if quant_type(k).quantized and compensated.compensable(k)]
        if kinds:
            work.append((tensor, weight, scale, kinds, covariances[tensor.gguf_name]))

    def options(tensor, weight, scale, kinds, covariance) -> list[Option]:
        factor = factors(covariance)
        if store is not None:
            store.save(tensor.gguf_name, factor)
        subset = sampled_rows(len(weight), ratio_rows(weight.shape[1]))
        part = weight[subset]
        blocks = compensated.compensated_rounds(part, covariance, kinds, tensor.importance, factor=factor)
        found = []
        for kind in kinds:
            rounded, _ = ggml_quants.roundtrip(kind, weight, tensor.importance, threads=1)
            restored = ggml_quants.dequantize(kind, blocks[kind], weight.shape[1])
            ours = compensated.output_error(part, restored, covariance)
            theirs = compensated.output_error(part, rounded[subset], covariance)
            error = scale * _error(weight, rounded, tensor.importance)
            found.append(Option(compensated.compensated_kind(kind), type_bytes(kind, tensor.shape),
                                error * ours / theirs if theirs > 0 else 0.0))
        return found

    found = compensated.layer_by_layer(lambda item: options(*item), work, lambda item: compensated.block_of(
        item[0].gguf_name), threads, factors.clear, size=lambda item: item[1].shape[1] * len(item[3]))
    return {item[0].gguf_name: opts for item, opts in zip(work, found)}


def compensable_inputs(model: nn.Module, tensors: Sequence[Tensor], windows: torch.Tensor
                       ) -> Iterator[dict[str, np.ndarray]]:
    """{GGUF name: input covariance} of the tensors error-compensated rounding may write, a group of decoder blocks
    at a time (`input_covariance_chunks`: what is held at once is bounded, whatever the model's size): every tensor
    that is a matmul's weight (the decoder's and an untied head), not the token embedding, a lookup table (tied, it
    is the head too, and its rows are the embedding's as well)."""
    names = [t.gguf_name for t in tensors if t.gguf_name != "token_embd.weight"]
    return input_covariance_chunks(model, windows, names)


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over positions of KL(reference || candidate), full vocabulary."""
    return float(F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(reference.float(), -1),
                          log_target=True, reduction="none").sum(-1).mean())


def layer_count(names) -> int:
    """Decoder layers among GGUF tensor names (blk.<i>.*)."""
    return 1 + max((int(n.split(".")[1]) for n in names if n.startswith("blk.")), default=-1)


def gain_groups(tensors: Sequence[Tensor], buckets: int = BUCKETS) -> dict[str, list[Tensor]]:
    """Tensors measured together for their KL gain: one role (attn_v, ffn_down, ...) in one band of
    consecutive layers (`buckets` bands), and the embedding and head each on their own."""
    count = layer_count(t.gguf_name for t in tensors) or 1
    groups: dict[str, list[Tensor]] = {}
    for tensor in tensors:
        parts = tensor.gguf_name.split(".")
        key = tensor.gguf_name if parts[0] != "blk" else f"{parts[2]}@{int(parts[1]) * buckets // count}"
        groups.setdefault(key, []).append(tensor)
    return groups


class _Replay:
    """The float pass's output of every decoder layer, replayed for the layers before a group's first one: they
    see exactly the float model's inputs, so their outputs are the float pass's, and only the layers from the
    group's first on are computed (about 40% of kl_gains' forward work saved on a 30-layer model; the head's
    group computes no layer at all)."""

    def __init__(self, model: nn.Module):
        prefix, self.layers = decoder_layers(model)
        self.prefix = prefix + "."
        head = model.get_output_embeddings()
        self.head = next((n for n, m in model.named_modules() if m is head), None)
        self.outputs: list = [None] * len(self.layers)

    def first_layer(self, held_by: Sequence[str]) -> int:
        """The first decoder layer whose input a group's modules change (0 for the embedding; past the last for
        the head; 0 for any module this cannot place, which replays nothing)."""
        firsts = []
        for name in held_by:
            if name.startswith(self.prefix):
                firsts.append(int(name[len(self.prefix):].split(".")[0]))
            else:
                firsts.append(len(self.layers) if name == self.head else 0)
        return min(firsts)

    @contextmanager
    def recording(self):
        def keep(index):
            def hook(module, args, output):
                self.outputs[index] = output
            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def from_layer(self, first: int):
        def replay(index):
            def forward(*args, **kwargs):
                output = self.outputs[index]  # a copy: a later layer may add to its input in place
                return output.clone() if torch.is_tensor(output) else (output[0].clone(), *output[1:])
            return forward

        for index in range(first):
            self.layers[index].forward = replay(index)  # the instance's forward shadows the class's
        try:
            yield
        finally:
            for index in range(first):
                del self.layers[index].forward


@torch.inference_mode()
def kl_gains(model: nn.Module, tensors: Sequence[Tensor], windows: torch.Tensor, probe: str = PROBE,
             buckets: int = BUCKETS, threads: int | None = None, replay: bool = True) -> dict[str, tuple[float, float]]:
    """{GGUF name: (KL, importance-weighted error)} of the tensor's group (`gain_groups`) stored in `probe`
    together, the rest of the model in float: a tensor's gain is its group's KL per unit of error. `replay`:
    the layers before a group's first are not computed again (`_Replay`); False runs every layer every time.
    A 16-bit model on a CPU without 16-bit instructions computes in float32 (`float32_compute`)."""
    with float32_compute(model):
        return _kl_gains(model, tensors, windows, probe, buckets, threads, replay)


def _kl_gains(model: nn.Module, tensors: Sequence[Tensor], windows: torch.Tensor, probe: str, buckets: int,
              threads: int | None, replay: bool) -> dict[str, tuple[float, float]]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = windows.to(device)
    replayed = _Replay(model) if replay else None
    with replayed.recording() if replayed else nullcontext():
        reference = model(input_ids=windows, use_cache=False).logits
    weights = weights_of(model, tensors)
    out = {}
    try:
        for members in gain_groups(tensors, buckets).values():
            originals, error = [], 0.0
            try:
                for tensor in members:
                    weight = weights[tensor.gguf_name]
                    kind = fallback_type(probe, weight.shape[1])
                    if not quant_type(kind).quantized:  # a width no block fits: llama.cpp keeps it in F16
                        continue
                    originals.append((weight, weight.detach().clone()))
                    array = originals[-1][1].float().cpu().numpy()
                    restored, _ = ggml_quants.roundtrip(kind, array, tensor.importance, threads)
                    error += _error(array, restored, tensor.importance)
                    weight.copy_(torch.from_numpy(restored).to(weight.dtype))
                first = replayed.first_layer([m for t in members for m in t.modules]) if replayed else 0
                with replayed.from_layer(first) if replayed else nullcontext():
                    kl = _kl(model(input_ids=windows, use_cache=False).logits, reference)
            finally:
                for weight, original in originals:
                    weight.copy_(original)
            for tensor in members:
                out[tensor.gguf_name] = (kl, error)
    finally:
        model.train(was_training)
    return out


def predicted_kl_options(options: Mapping[str, list[Option]], gains: Mapping[str, tuple[float, float]]
                         ) -> dict[str, list[Option]]:
    """The options with their error turned into predicted KL (gain x error; a tensor whose probe error is 0,
    e.g. all-zero weights, costs nothing in any type)."""
    scaled = {}
    for name, opts in options.items():
        kl, error = gains[name]
        gain = kl / error if error > 0 else 0.0
        scaled[name] = [Option(o.kind, o.bytes, max(gain, 0.0) * o.error) for o in opts]
    return scaled


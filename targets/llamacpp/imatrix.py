"""The importance matrix llama.cpp's quantizer weighs its rounding errors by, computed by the planner in torch.

What llama.cpp's `llama-imatrix` collects (tools/imatrix/imatrix.cpp, llama-cpp-python 0.3.36's vendored
llama.cpp): for every matrix multiplication whose weight is a `blk.*` tensor (plus `output.weight` under
--process-output), the sum over tokens of each input column's squared activation (`in_sum2`) and the number
of tokens (`counts`; one count per expert for MoE `mul_mat_id`, not handled here: dense decoders only).
`llama-quantize` hands the quantizer in_sum2 / counts: the mean squared input activation per input column,
which is what `importance_matrix` returns, per GGUF tensor name, from forward pre-hooks on the model's
nn.Linear layers over calibration windows (search_spaces.calibration.calibration_batches). It is a pure
function of (model, windows): the caller caches it, and computes it for the model it quantizes (a pruned
model or a student has activations of its own).

`write_imatrix_file` writes the GGUF imatrix format llama-imatrix writes by default today, so a user can run
`llama-quantize --imatrix FILE` on the shipped model: no `general.architecture`, `general.type = "imatrix"`,
`imatrix.datasets` (strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32; llama-quantize refuses the
file without all three), and per tensor `<name>.in_sum2` (F32, ggml ne = [columns, matrices]) and
`<name>.counts` (F32, ne = [1, matrices]), tensors in sorted name order. (llama.cpp before mid-2025 wrote a
`.dat` binary instead; current llama-quantize reads both, so only the current format is written.) The file
holds the tensors llama-imatrix collects (with --process-output): `blk.*` and `output.weight`, never
`token_embd.weight`, whose entry the planner computes for a tied head and quantizes with, but llama-imatrix
never sees (its callback takes `output.weight` by name only).
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext

from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from search_spaces.compute import float32_compute
from search_spaces.layers import decoder_layers, text_config
from targets.llamacpp.compensated import block_of
from targets.llamacpp.gguf_file import ARCHITECTURES
from targets.llamacpp.quantize import IMATRIX_ENTRIES_KEY

IMATRIX_TYPE = "imatrix"
IMATRIX_FILE = "imatrix.gguf"  # shipped beside a model quantized with the planner's importance matrix
# the dataset words an importance matrix computed by the planner carries (imatrix.datasets, quantize.imatrix.dataset)
CALIBRATION_DATASET = "planner: {samples} x {seq_len} tokens of the calibration (training) split"
# the keys llama-quantize adds to a model quantized with an importance matrix (tools/quantize/quantize.cpp)
QUANTIZE_KEYS = {"file": "quantize.imatrix.file", "dataset": "quantize.imatrix.dataset",
                 "entries": IMATRIX_ENTRIES_KEY, "chunks": "quantize.imatrix.chunks_count"}

# bytes of input covariances held at once by error-compensated rounding (input_covariance_chunks)
COVARIANCE_BUDGET = 2 << 30


def gguf_arch_name(model: nn.Module) -> str:
    """The GGUF architecture of the model's file: the hand-written writer's, else the one llama.cpp's converter
    writes for its HF architecture (Cohere's is `command-r`, GPT-NeoX's `gptneox`: not their model types)."""
    config = text_config(model)
    if config.model_type in ARCHITECTURES:
        return ARCHITECTURES[config.model_type]
    from targets.llamacpp.convert import architectures, hf_architecture

    return architectures().get(hf_architecture(model.config, type(model).__name__)) or config.model_type


def gguf_linear_names(model: nn.Module, head: bool = False) -> dict[str, str]:
    """{module name: GGUF tensor name} of every nn.Linear whose input llama-imatrix collects: the decoder
    blocks' (gguf-py's TensorNameMap, so any architecture it knows), and with `head` the LM head's, named
    `output.weight`, or `token_embd.weight` when tied (the tensor llama.cpp quantizes for it)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    config = text_config(model)
    arch_name = gguf_arch_name(model)
    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ValueError(f"gguf knows no architecture {arch_name!r}: no GGUF tensor names for its layers")
    names = get_tensor_name_map(arch, config.num_hidden_layers)
    head_module = model.get_output_embeddings()
    out = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if module is head_module:
            if head:
                tied = head_module.weight is model.get_input_embeddings().weight
                out[module_name] = "token_embd.weight" if tied else "output.weight"
        elif gguf_name is None or not gguf_name.startswith("blk."):
            raise ValueError(f"no GGUF tensor name for {module_name} (an expert or a layer gguf does not map)")
        else:
            out[module_name] = gguf_name
    return out


def collected_by_llama_imatrix(name: str) -> bool:
    """Whether llama-imatrix collects this tensor's inputs (tools/imatrix/imatrix.cpp, collect_imatrix: a name
    starting with `blk.`, or `output.weight` under --process-output)."""
    return name.startswith("blk.") or name == "output.weight"


def imatrix_digest(imatrix: dict[str, np.ndarray]) -> str:
    """A digest of an importance matrix's names and float32 values (what a recipe records of it: a rebuild on
    another CPU may sum the activations in another order, and this says whether it did)."""
    digest = hashlib.sha256()
    for name in sorted(imatrix):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(imatrix[name], dtype=np.float32).tobytes())
    return digest.hexdigest()[:24]


@torch.inference_mode()
def importance_matrix(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                      head: bool = False) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 mean over the windows' tokens of each input column's squared activation}.

    `windows`: (n, seq_len) token ids, every token counted (as llama-imatrix counts every token of a chunk).
    Sums are accumulated in float64. Without `head` only the decoder runs (the LM head's matmul is skipped,
    as llama-imatrix skips output.weight by default).
    """
    return _input_means(model, windows, batch_size, head, lambda x: x.double().square().sum(dim=0))


@torch.inference_mode()
def input_covariances(model: nn.Module, windows: torch.Tensor, names: Sequence[str] | None = None,
                      batch_size: int = 4, head: bool = True) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 mean over the windows' tokens of x x^T, x the tensor's input}: the second moment
    error-compensated rounding minimises the output error under (its diagonal is `importance_matrix`'s entry).
    `names`: only these tensors (all the linear layers by default); tensors fed the same input (q/k/v, gate/up)
    share one array."""
    # float32 throughout (a batch's thousand-odd products and a handful of batches: nothing the damped rounding
    # notices is lost, it is twice as fast, and a 1B model's covariances are 5 GB in float32, 10 in float64)
    return _input_means(model, windows, batch_size, head, _second_moment, names)


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    return x.float().T @ x.float()


def covariance_chunks(model: nn.Module, names: Sequence[str], budget: int = COVARIANCE_BUDGET,
                      head: bool = True) -> list[list[str]]:
    """`names` (GGUF tensors) in groups of whole decoder blocks, in the model's order, each group's input
    covariances within `budget` bytes (float32, one width x width array per tensor: tensors sharing an input make it
    an overestimate); a block larger than the budget is a group of its own, tensors outside the blocks (the head)
    the last group."""
    wanted, modules = set(names), dict(model.named_modules())
    widths = {g: modules[m].in_features for m, g in gguf_linear_names(model, head).items() if g in wanted}
    blocks: dict[str, list[str]] = {}
    for g in widths:  # named_modules order: the model's
        blocks.setdefault(block_of(g), []).append(g)
    chunks, held = [[]], 0
    for key, members in blocks.items():
        size = sum(4 * widths[g] ** 2 for g in members)
        if chunks[-1] and (held + size > budget or not key.startswith("blk.")):
            chunks.append([])
            held = 0
        chunks[-1].extend(members)
        held += size
    return [c for c in chunks if c]


def input_covariance_chunks(model: nn.Module, windows: torch.Tensor, names: Sequence[str],
                            budget: int = COVARIANCE_BUDGET, batch_size: int = 4,
                            head: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """`input_covariances` of `names` a group of decoder blocks at a time (`covariance_chunks`): what is held at once
    stays within `budget` whatever the model's size (a 1B model's covariances are 5 GB, a 3B's 11). Each group is
    its own pass over the windows, stopped at the first decoder layer past the group, and the next group's pass
    starts where it stopped (`_Resume`): the groups together cost one forward pass, and the same sums."""
    resume = _Resume(model)
    for chunk in covariance_chunks(model, names, budget, head):
        yield _input_means(model, windows, batch_size, head, _second_moment, chunk, resume)


class _Resume:
    """Where a pass of a group of blocks stopped: the stop layer's index and its input, per batch. The next group's
    pass starts there: the layers before it are not run (each hands on what it is given, the last of them the
    stored input), so passes over c groups of blocks cost one forward pass, not (c + 1) / 2 (at 1.24 B, 2.5
    passes of a 4096-token calibration set were 6-8 minutes on 2 cores)."""

    def __init__(self, model: nn.Module):
        try:
            self.layers = list(decoder_layers(model)[1])
        except ValueError:
            self.layers = []
        self.at, self.inputs, self.tuples = 0, {}, False

    def stop_hook(self, batch: int):
        def stop(module, args, kwargs):
            self.inputs[batch] = args[0] if args else kwargs["hidden_states"]
            raise _Enough
        return stop

    def first_hook(self, module, args, output) -> None:
        self.tuples = not torch.is_tensor(output)  # older decoder layers return (hidden_states, ...)

    def last_hook(self, batch: int):
        def keep(module, args, output):  # a pass that runs to the end: what the head's group starts from
            self.inputs[batch] = output if torch.is_tensor(output) else output[0]
        return keep

    def stopped(self, at: int) -> None:
        """The pass just run stopped at layer `at` (the layer count: it ran to the end and kept the last layer's
        outputs; 0: nothing to resume from)."""
        self.at = at
        if not at:
            self.inputs = {}

    @contextmanager
    def resumed(self, batch: int):
        """Within it, the layers before the stop layer are not run for `batch` (if a stored input is there)."""
        if not self.at or batch not in self.inputs:
            yield
            return

        def skipped(index: int):
            def forward(*args, **kwargs):
                given = self.inputs[batch] if index == self.at - 1 else (args[0] if args else kwargs["hidden_states"])
                return (given,) if self.tuples else given
            return forward

        shadowed = [(layer, layer.__dict__.get("forward")) for layer in self.layers[:self.at]]
        for index, (layer, _) in enumerate(shadowed):
            layer.forward = skipped(index)  # the instance's forward shadows the class's (and any earlier one)
        try:
            yield
        finally:
            for layer, earlier in shadowed:
                if earlier is None:
                    del layer.forward
                else:
                    layer.forward = earlier


class _Enough(Exception):
    """Raised by the first decoder layer past the ones whose inputs are collected: the rest of the pass is not
    needed."""


def _layer_span(model: nn.Module, names: Mapping[str, str]) -> tuple[int, int | None]:
    """(the first decoder layer holding a module of `names`, the layer after the last one; None: the pass must run
    to the end); (0, None) where the layers are not found. A module outside the blocks counts as past the last
    layer (the head)."""
    try:
        prefix, layers = decoder_layers(model)
    except ValueError:
        return 0, None
    indices = [int(n[len(prefix) + 1:].split(".")[0]) if n.startswith(prefix + ".") else len(layers) for n in names]
    first, last = min(indices, default=0), max(indices, default=len(layers))
    return first, (last + 1 if last + 1 < len(layers) else None)


@torch.inference_mode()  # also under input_covariance_chunks, a generator (no autograd graph kept for nothing)
def _input_means(model: nn.Module, windows: torch.Tensor, batch_size: int, head: bool, statistic,
                 only: Sequence[str] | None = None, resume: "_Resume | None" = None) -> dict[str, np.ndarray]:
    """{GGUF tensor name: the mean over the windows' tokens of `statistic` of each linear layer's input (`statistic`
    returns a batch's sum, summed over batches in its dtype; float32 result)}; layers reading the very same input
    tensor in a forward share one sum. With `only`, each pass stops at the first decoder layer past theirs."""
    names = {m: g for m, g in gguf_linear_names(model, head).items() if only is None or g in only}
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    owner: dict[str, str] = {}  # module -> the module whose sum it shares
    seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs (kept alive: identity is the test)

    def hook(module_name):
        def collect(module, inputs):
            given = inputs[0]  # the very object the forward passed (detach() would make a new one each call)
            x = given.detach()
            first = next((name for ref, name in seen if ref is given), None)
            counts[module_name] += x.numel() // x.shape[-1]
            if first is not None:
                owner.setdefault(module_name, first)
                return
            seen.append((given, module_name))
            value = statistic(x.reshape(-1, x.shape[-1]))  # the sum of one batch
            sums[module_name] = value if module_name not in sums else sums[module_name].add_(value)
        return collect

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    first, stop = _layer_span(model, names) if only is not None else (0, None)
    if resume is not None and not resume.layers:
        resume = None
    if resume is not None and resume.at > first:  # not a group after the stored inputs' layer: from the start
        resume.stopped(0)
    if resume is not None:
        handles.append(resume.layers[0].register_forward_hook(resume.first_hook))
    was_training = model.training
    model.eval()
    runner = model if head else model.get_decoder()
    device = next(model.parameters()).device
    stopper = None if stop is None else decoder_layers(model)[1][stop]
    try:
        with float32_compute(model):
            for batch, start in enumerate(range(0, windows.shape[0], batch_size)):
                seen.clear()
                if resume is None:
                    hook_ = None if stopper is None else stopper.register_forward_pre_hook(_enough)
                elif stopper is None:
                    hook_ = resume.layers[-1].register_forward_hook(resume.last_hook(batch))
                else:
                    hook_ = stopper.register_forward_pre_hook(resume.stop_hook(batch), with_kwargs=True)
                try:
                    with resume.resumed(batch) if resume is not None else nullcontext():
                        runner(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                except _Enough:
                    pass
                finally:
                    if hook_ is not None:
                        hook_.remove()
        if resume is not None:
            resume.stopped(len(resume.layers) if stop is None else stop)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("no calibration tokens reached the model's linear layers")
    means = {}
    for m in list(sums):  # in place, one at a time: no second copy of every sum at once
        means[m] = sums.pop(m).div_(counts[m]).float().cpu().numpy()
    return {names[m]: means[owner.get(m, m)] for m in names}


def _enough(module, inputs):
    raise _Enough


def write_imatrix_file(path: Path, matrix: Mapping[str, np.ndarray], tokens: int, chunk_size: int,
                       datasets: Sequence[str]) -> None:
    """Write `matrix` (per tensor, mean squared activation per column) as llama-imatrix's GGUF file: the entries
    llama-imatrix collects (`collected_by_llama_imatrix`; others, e.g. a tied head's token_embd.weight, are left out).

    `tokens`: calibration tokens each entry was averaged over (in_sum2 = mean x tokens, counts = tokens);
    `chunk_size`: tokens per calibration window (llama-imatrix's chunk, its n_ctx), chunk_count =
    tokens // chunk_size; `datasets`: what the calibration text was (at least one line).
    """
    from gguf import GGUFWriter, Keys

    if not datasets:
        raise ValueError("name the calibration data: llama-quantize refuses an imatrix file without datasets")
    if tokens < 1 or chunk_size < 1:
        raise ValueError(f"need tokens and chunk size >= 1, got {tokens} and {chunk_size}")
    collected = sorted(name for name in matrix if collected_by_llama_imatrix(name))
    if not collected:
        raise ValueError("no entry llama-imatrix collects (blk.* or output.weight) in this importance matrix")
    writer = GGUFWriter(str(path), arch="")  # an empty arch writes no general.architecture, as llama-imatrix
    try:
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(Keys.IMatrix.DATASETS, [str(d) for d in datasets])
        writer.add_uint32(Keys.IMatrix.CHUNK_COUNT, tokens // chunk_size)
        writer.add_uint32(Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for name in collected:
            means = np.asarray(matrix[name], dtype=np.float64).reshape(1, -1)  # one matrix: a dense layer
            writer.add_tensor(f"{name}.in_sum2", (means * tokens).astype(np.float32))
            writer.add_tensor(f"{name}.counts", np.full((1, 1), float(tokens), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_imatrix_file(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(per tensor the mean squared activation per column, as llama-quantize derives it: in_sum2 / counts
    per matrix, 1 where a count is 0; {"datasets", "chunk_count", "chunk_size", "counts"}) of a GGUF imatrix."""
    from gguf import GGUFReader, Keys

    reader = GGUFReader(str(path))
    if IMATRIX_TYPE != _field(reader, Keys.General.TYPE):
        raise ValueError(f"{path} is not a GGUF imatrix file (general.type {_field(reader, Keys.General.TYPE)!r})")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    matrix, counts = {}, {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        count = tensors[f"{name}.counts"].reshape(-1)
        sums = sums.reshape(count.size, -1)
        safe = np.where(count > 0, count, 1.0)[:, None]
        matrix[name] = np.where(count[:, None] > 0, sums / safe, 1.0).reshape(-1).astype(np.float32)
        counts[name] = count.astype(np.int64)
    info = {"datasets": list(_field(reader, Keys.IMatrix.DATASETS) or []),
            "chunk_count": _field(reader, Keys.IMatrix.CHUNK_COUNT),
            "chunk_size": _field(reader, Keys.IMatrix.CHUNK_SIZE), "counts": counts}
    return matrix, info


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def quantize_metadata(matrix: Mapping[str, np.ndarray], file: str | None, datasets: Sequence[str],
                      chunk_count: int) -> dict[str, object]:
    """The `quantize.imatrix.*` keys llama-quantize writes into a model quantized with an imatrix file
    (pass as quantize_gguf's `metadata`): the file's name, its first dataset, entries and chunks."""
    out: dict[str, object] = {QUANTIZE_KEYS["entries"]: len(matrix)}
    if file:
        out[QUANTIZE_KEYS["file"]] = str(file)
    if datasets:
        out[QUANTIZE_KEYS["dataset"]] = str(datasets[0])
    if chunk_count > 0:
        out[QUANTIZE_KEYS["chunks"]] = int(chunk_count)
    return out

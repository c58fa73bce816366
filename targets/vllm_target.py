"""The vLLM target (GPU): rtn/GPTQ candidates ship as compressed-tensors checkpoints, which vLLM serves with
its own integer kernels. Unverified: nothing in this project's CI has a GPU or vLLM, so only the export half
(the checkpoint, shared with the transformers target) is tested; the README says so. It is refused up front,
with one line, where vLLM or a GPU is missing.

What its figures are, until vLLM itself times trials: a trial's figures (latency included) are measured in
transformers on the candidate's exact weights, and say so (`measurements["runtime"]["measured_in"]`); `apply`
adds vLLM's end-to-end generation time per token (prefill included) as `vllm_generate_ms_per_token`, which is
not a decode time and judges no budget."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from search_spaces.quantization import fit_to_scheme
from search_spaces.quantization.grid import COMPRESSED_TENSORS_GRID
from targets.base import Measured, Request, Target, register_target
from targets.transformers_target import TRANSFORMERS, measure_torch


class VllmTarget(Target):
    name = "vllm"
    artifacts = frozenset({"compressed-tensors"})
    runtime = "vLLM"
    artifact = "a compressed-tensors checkpoint folder"

    def unavailable(self, device: str) -> str | None:
        import torch

        if not torch.cuda.is_available():
            return "vLLM needs a CUDA GPU and none is present"
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "vllm is not installed (pip install vllm)"
        return None

    def fit_spaces(self, spaces: dict, model) -> dict:
        quant = spaces.get("quantization")
        if quant is None:
            return spaces
        return {**spaces, "quantization": fit_to_scheme(quant, COMPRESSED_TENSORS_GRID)}

    def measure(self, request: Request, model, label: str) -> Measured:
        # vLLM does not hand back full-vocabulary logits cheaply, and is not timed per trial yet: every figure
        # here is transformers' on the candidate's exact weights, labelled so.
        measured = measure_torch(request, model, label)
        measured.details["runtime"] = {"target": self.name, "measured_in": TORCH_FIGURES}
        return measured

    def ship(self, model, tokenizer, stages: list, out: Path, runtime: dict | None = None) -> Path:
        return TRANSFORMERS.ship(model, tokenizer, stages, out, runtime)

    def measure_shipped(self, request: Request, artifact: Path) -> Measured:
        """Perplexity and stored bytes of the checkpoint as transformers loads it (what `apply` checks), and
        vLLM's end-to-end generation time per token (prefill included: not a decode time)."""
        from vllm import LLM, SamplingParams

        measured = TRANSFORMERS.measure_shipped(request, artifact)
        protocol = request.latency
        llm = LLM(model=str(artifact), enforce_eager=False, max_model_len=protocol.prompt_tokens + protocol.new_tokens)
        prompt = {"prompt_token_ids": list(range(1, protocol.prompt_tokens + 1))}
        params = SamplingParams(max_tokens=protocol.new_tokens, temperature=0.0, ignore_eos=True)
        samples = []
        for index in range(protocol.warmup + protocol.repeats):
            started = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            if index >= protocol.warmup:
                samples.append((time.perf_counter() - started) * 1e3 / protocol.new_tokens)
        measured.row["vllm_generate_ms_per_token"] = statistics.median(samples)
        measured.details["vllm"] = {"generate_ms_per_token_end_to_end": samples}
        measured.details["runtime"] = {"target": self.name, "measured_in": TORCH_FIGURES}
        return measured

    def how_to_load(self, artifact: Path, latency) -> str:
        return f"serve it with vLLM, e.g. vllm serve {artifact}"


TORCH_FIGURES = "transformers (PyTorch), not vLLM: vLLM does not time trials yet"
VLLM = register_target(VllmTarget())

"""The vLLM target (GPU): rtn/GPTQ candidates ship as compressed-tensors checkpoints, which vLLM serves with
its own integer kernels, and are timed in vLLM's engine. Unverified: nothing in this project's CI has a GPU
or vLLM, so only the export half (the checkpoint, shared with the transformers target) is tested; the
README says so. It is refused up front, with one line, where vLLM or a GPU is missing."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from targets.base import Target, register_target
from targets.transformers_target import TRANSFORMERS, measure_torch


class VllmTarget(Target):
    name = "vllm"
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
        from dataclasses import replace

        quant = spaces.get("quantization")
        if quant is None:
            return spaces
        methods = tuple(m for m in quant.methods if m in ("none", "rtn", "gptq"))
        return {**spaces, "quantization": replace(quant, methods=methods or ("none",))}

    def measure(self, bench, model, label: str, trial=None) -> tuple[dict, dict]:
        # Perplexity, KL and memory from the candidate's exact weights in torch; latency from vLLM's engine on
        # the shipped checkpoint (vLLM does not hand back full-vocabulary logits cheaply).
        row, details = measure_torch(bench, model, label, trial)
        return row, details

    def ship(self, model, tokenizer, stages: list, out: Path) -> Path:
        return TRANSFORMERS.ship(model, tokenizer, stages, out)

    def measure_shipped(self, bench, artifact: Path) -> tuple[dict, dict]:
        """Perplexity and stored bytes of the checkpoint as transformers loads it (what `apply` checks), and
        its decode time per token in vLLM's engine."""
        from vllm import LLM, SamplingParams

        row, details = TRANSFORMERS.measure_shipped(bench, artifact)
        protocol = bench.settings.latency_protocol()
        llm = LLM(model=str(artifact), enforce_eager=False, max_model_len=protocol.prompt_tokens + protocol.new_tokens)
        prompt = {"prompt_token_ids": list(range(1, protocol.prompt_tokens + 1))}
        params = SamplingParams(max_tokens=protocol.new_tokens, temperature=0.0, ignore_eos=True)
        samples = []
        for index in range(protocol.warmup + protocol.repeats):
            started = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            if index >= protocol.warmup:
                samples.append((time.perf_counter() - started) * 1e3 / protocol.new_tokens)
        row["decode_ms_p50"] = statistics.median(samples)
        details["latency"] = {"runtime": "vllm", "ms_per_token_end_to_end": samples}
        return row, details


VLLM = register_target(VllmTarget())

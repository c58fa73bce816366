"""The costly half of a large derived candidate's sensitivity tables, carried from its source model's.

A candidate that distillation or pruning derived from the source model (a student, a cut, a healed cut) is a model
not seen before, so llama-quant computes its tables (`allocated.sensitivity_tables`). Two of their parts are its
own weights' and cheap: the importance matrix (one calibration pass) and each tensor's error in every type
(llama.cpp's rounding of 128 sampled rows). Two are factors per unit of that error and costly: the KL gain (the
model's KL per unit of a group's error: about 30 forward passes) and the compensated options' ratio of output
errors (compensated rounding of every type: rows x width^2 each). On a 1.24 B model held in bfloat16 on 2 AVX2
cores those two were a third of a student's llama-quant trial (py-spy of a study's trial). On a candidate of at
least `CARRY_PARAMETERS` they are carried from the source model's tables (when those are cached, from the same
calibration tokens): each tensor takes the factors of the source tensor of its role at the same relative depth,
and they scale the candidate's own errors. What this costs in accuracy: bench/carried_tables.py. Every candidate
is still built and measured in full; the tables only choose its types.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from search_spaces.quantization.allocation import Option
from targets.llamacpp.compensated import base_kind, compensated_kind
from targets.llamacpp.sensitivity import layer_count

# Candidates at least this large carry (the built-in 135 M model's candidates compute their own tables in full).
CARRY_PARAMETERS = 400_000_000


def source_name(name: str, layers: int, source_layers: int) -> str:
    """The source model's tensor of the same role at the same relative depth: layer i of `layers` -> the source
    layer holding the middle of i's share of the depth (the head and the embedding are themselves)."""
    parts = name.split(".")
    if parts[0] != "blk":
        return name
    parts[1] = str(min(source_layers - 1, int((int(parts[1]) + 0.5) * source_layers / layers)))
    return ".".join(parts)


@dataclass(frozen=True)
class SourceTables:
    """What a derived candidate's tables carry: the source model's KL gains ({name: (KL, error)}) and, where its
    compensated options were computed, each compensated type's ratio to llama.cpp's rounding ({name: {type: r}})."""

    folder: Path
    gains: dict[str, tuple[float, float]]
    ratios: dict[str, dict[str, float]] | None

    @classmethod
    def read(cls, folder: Path | None) -> "SourceTables | None":
        """The source tables in `folder` (`allocated._cache_file` of the source model), None where they are not
        cached (or were written before their plain errors were kept beside them)."""
        if folder is None or not (folder / "table.json").is_file():
            return None
        table = json.loads((folder / "table.json").read_text())
        if "errors" not in table:
            return None
        ratios = None
        if (folder / "compensated.json").is_file():
            plain = {n: {kind: error for kind, _, error in options} for n, options in table["errors"].items()}
            ratios = {}
            for name, options in json.loads((folder / "compensated.json").read_text()).items():
                ratios[name] = {base_kind(kind): error / plain[name][base_kind(kind)]
                                for kind, _, error in options if plain[name].get(base_kind(kind), 0) > 0}
        return cls(folder, {n: tuple(g) for n, g in table["gains"].items()}, ratios)

    def _counterparts(self, names) -> dict[str, str] | None:
        mapped = {n: source_name(n, layer_count(names), layer_count(self.gains)) for n in names}
        return mapped if all(m in self.gains for m in mapped.values()) else None

    def carried_gains(self, names) -> dict[str, tuple[float, float]] | None:
        """{name: the KL gain of its source counterpart}, None where a name has none (another architecture)."""
        mapped = self._counterparts(names)
        return None if mapped is None else {n: self.gains[m] for n, m in mapped.items()}

    def carried_compensated(self, errors: dict[str, list[Option]], names) -> dict[str, list[Option]] | None:
        """The compensated options (``<type>+gptq``, plain errors) of tensors `names`: each type's own error in
        `errors` (`sensitivity.type_options` of the candidate) times its source counterpart's ratio; a type the
        counterpart has no ratio for (another row width's fallback) gets no compensated option. None where the
        source's compensated options were not computed."""
        mapped = self._counterparts(names)
        if self.ratios is None or mapped is None:
            return None
        carried = {}
        for name in names:
            ratios = self.ratios.get(mapped[name], {})
            carried[name] = [Option(compensated_kind(o.kind), o.bytes, o.error * ratios[o.kind])
                             for o in errors[name] if o.kind in ratios]
        return carried


def carries(model: nn.Module, upstream) -> bool:
    """Whether this candidate's tables carry the source model's factors: derived (stages before quantization) and
    at least `CARRY_PARAMETERS` large."""
    return bool(upstream) and _large(model)


def carried_from(model: nn.Module, upstream) -> bool:
    """Whether this model's costly tables are what its large derived candidates carry: the source model (no stages
    before quantization), at least `CARRY_PARAMETERS` large (a smaller source's candidates are smaller still)."""
    return not upstream and _large(model)


def _large(model: nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) >= CARRY_PARAMETERS

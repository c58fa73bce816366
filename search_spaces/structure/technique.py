"""What pruning and distillation share as techniques: candidates that change the model's shape by keep ratios
(depth, MLP width, KV groups), sized exactly from the derived config, fitted to what the model can take."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from search_spaces.base import Params, Technique
from search_spaces.structure.shape import (RATIO_FIELDS, SizeEstimate, estimate_size, fit_field, off_params,
                                           smallest_shape, spec_config)


class StructuredTechnique(Technique):
    """Spaces hold `enabled` and the keep-ratio choices; specs have `structure` and `summary()`; `apply` leaves
    what it did on the built model as the attribute named `report_attribute`."""

    report_attribute: str

    def suggest(self, trial, space):
        """None when the trial leaves the stage off, else `suggest_when_on`."""
        if not self.choose(trial, "enabled", space.enabled):
            return None
        return self.suggest_when_on(trial, space)

    def suggest_when_on(self, trial, space):
        """A spec from the space's choices, or None when the sampled cut changes nothing."""
        raise NotImplementedError

    def report_of(self, model: nn.Module):
        """What `apply` did to this model (kept, trained, cached), or None for a model it did not build."""
        return getattr(model, self.report_attribute, None)

    def fit(self, space, model: nn.Module):
        """One ratio per distinct count, and no cut the model's config cannot express (structure.shape); and why
        cuts were left out: field -> one line, for each field that loses a ratio cutting something. One pass:
        finding what blocks a cut probes the model."""
        fitted = {n: fit_field(model, n, getattr(space, n)) for n in RATIO_FIELDS}
        return (replace(space, **{n: ratios for n, (ratios, _) in fitted.items()}),
                {n: reason for n, (_, reason) in fitted.items() if reason})

    def fit_space(self, space, model: nn.Module):
        return self.fit(space, model)[0]

    def fit_reasons(self, space, model: nn.Module) -> dict[str, str]:
        return self.fit(space, model)[1]

    def describe(self, spec, notes: dict | None = None) -> str:
        return spec.summary()

    def derive_config(self, config, spec):
        return spec_config(config, spec.structure, self.spec_type.__name__)

    def estimate(self, model: nn.Module, spec) -> SizeEstimate:
        """Exact parameters and stored weight bytes of what `apply` builds, without building it."""
        return estimate_size(self.derive_config(model.config, spec), model)

    def off(self, space) -> Params:
        return off_params(space)

    def smallest(self, space) -> list[Params]:
        return smallest_shape(space)

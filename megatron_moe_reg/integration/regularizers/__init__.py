"""The registry of regularizers: name -> builder (``InstallContext -> Regularizer | None``).

``install.Regularizers`` builds every entry, in this order, and drives the ones a builder returns.
Adding one: a pure function in ``losses/``, a component class with a ``build`` here, one line in
``REGULARIZERS``, and its coefficient field in ``config.PluginConfig`` (``config.coefficient``).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_moe_reg.integration.regularizers import (
    coupling,
    expert_similarity,
    orthogonality,
    routing,
    specialization,
)
from megatron_moe_reg.integration.regularizers.base import InstallContext, Regularizer, RegularizerBase, StepPlan

Builder = Callable[[InstallContext], Regularizer | None]

REGULARIZERS: dict[str, Builder] = {
    "specialization": specialization.build,
    "coupling": coupling.build,
    "routing": routing.build,
    "weight_orthogonality": orthogonality.build,
    "expert_similarity": expert_similarity.build,
}

__all__ = ["REGULARIZERS", "Builder", "InstallContext", "Regularizer", "RegularizerBase", "StepPlan"]

"""Flow-matching core: probability paths, couplings, time samplers, ODE solvers and guidance."""
from phenoflow.flow.couplings import (
    Coupling,
    build_coupling,
    control_source,
    independent,
    minibatch_ot,
    pick_controls,
)
from phenoflow.flow.guidance import guided_velocity, make_velocity_fn
from phenoflow.flow.paths import (
    BrownianBridgePath,
    LinearPath,
    VPPath,
    build_path,
    build_time_sampler,
    sample_time,
)
from phenoflow.flow.solvers import counterfactual, integrate

__all__ = [
    "BrownianBridgePath", "Coupling", "LinearPath", "VPPath", "build_coupling", "build_path", "build_time_sampler",
    "control_source", "counterfactual", "guided_velocity", "independent", "integrate", "make_velocity_fn",
    "minibatch_ot", "pick_controls", "sample_time",
]

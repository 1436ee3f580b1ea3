"""Scheduler names of the wire format (spec 1.11): which names this server runs, their canonical
diffusers class names, and the `algorithm_type` values. Plain data, so the web tier validates a
request without importing torch; the engine builds the scheduler (`infra.engine.cache.build_scheduler`).

Four of the 18 documented names cannot drive a latent Stable Diffusion model as diffusers
ships them, and are rejected with a clear error instead of returning garbage:
KarrasVeScheduler (its `step()` needs a `sample_hat` no pipeline passes), ScoreSdeVeScheduler
(no `step()` at all), IPNDMScheduler (timesteps 1.0..0.1 instead of 0..999, noise out of real
weights) and DDIMInverseScheduler (runs the process backwards: it inverts images, it does not
generate them).
"""

from __future__ import annotations

SUPPORTED = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
)

# the flow-matching samplers of the transformer families (Flux.1): the only ones those models take,
# and the ones SD models cannot take (Heun's set_timesteps takes no `sigmas`, which Flux needs)
FLOW_MATCHING = ("FlowMatchEulerDiscreteScheduler",)

UNSUPPORTED = {
    "DDIMInverseScheduler": "it runs diffusion backwards (image -> noise) and is meant for inversion",
    "IPNDMScheduler": "its timesteps (1.0..0.1) do not match the 0..999 timesteps SD models are trained on",
    "KarrasVeScheduler": "it is a pixel-space variance-exploding sampler whose step() no SD pipeline can call",
    "ScoreSdeVeScheduler": "it is a score-SDE sampler without the step() an SD pipeline needs",
}

# wire value -> diffusers algorithm_type, per scheduler that has one
_DPM_ALGORITHMS = {"dpmsolver+++": "sde-dpmsolver++", "dpmsolver++": "dpmsolver++", "sde-dpmsolver++": "sde-dpmsolver++"}
ALGORITHMS = {"DPMSolverMultistepScheduler": _DPM_ALGORITHMS, "DPMSolverSinglestepScheduler": _DPM_ALGORITHMS}
ALGORITHM_WIRE_VALUES = ("none", "dpmsolver+++", "dpmsolver++", "sde-dpmsolver++")


class SchedulerError(ValueError):
    """A scheduler name or option that cannot be used; the message says what works."""


def resolve_name(name: str) -> str:
    """Canonical scheduler class name for a wire name (exact, or ignoring case)."""
    for known in (*SUPPORTED, *FLOW_MATCHING, *UNSUPPORTED):
        if name == known or name.lower() == known.lower():
            if known in UNSUPPORTED:
                raise SchedulerError(
                    f"scheduler {known} cannot be used with Stable Diffusion models: {UNSUPPORTED[known]}. "
                    f"Use one of: {', '.join(SUPPORTED)}"
                )
            return known
    raise SchedulerError(f"unknown scheduler {name!r}. Use one of: {', '.join(SUPPORTED)} (Flux, SD3, Qwen-Image, Z-Image: "
                         f"{', '.join(FLOW_MATCHING)})")


# the families of flow-matching transformers (the model's family -> how a message names such a model)
FLOW_FAMILIES = {"flux": "a Flux model", "sd3": "an SD3 model", "qwen": "a Qwen-Image model", "zimage": "a Z-Image model",
                 "flux2": "a Flux.2 model", "flux2_klein": "a Flux.2 Klein model"}
# the families whose guidance is distilled into the model: they take no negative prompt
DISTILLED_FAMILIES = ("flux", "flux2", "flux2_klein")


def check_family(name: str, family: str, model_id: str) -> None:
    """A scheduler the model's family can run: flow-matching ones for the transformer families, the others for SD."""
    if family in FLOW_FAMILIES and name not in FLOW_MATCHING:
        raise FamilyMismatch(f"{model_id} is {FLOW_FAMILIES[family]}: it takes {', '.join(FLOW_MATCHING)} only, "
                             f"not {name}")
    if family not in FLOW_FAMILIES and name in FLOW_MATCHING:
        raise FamilyMismatch(f"{name} is for Flux, SD3 and the other flow-matching models; {model_id} takes one of: "
                             f"{', '.join(SUPPORTED)}")


class FamilyMismatch(ValueError):
    """A scheduler that exists but not for this model's family (a 400: the schema cannot know the model)."""


def resolve_algorithm(scheduler: str, algorithm_type: str) -> str | None:
    """The diffusers algorithm_type for this scheduler, or None to keep its default.

    `dpmsolver+++` (the wire value, which diffusers does not know) means the SDE variant of
    DPM-Solver++ ("DPM++ SDE"). Schedulers without an algorithm ignore the field, as the docs
    say it only applies to DPMSolverMultistepScheduler.
    """
    value = algorithm_type.strip(" \t\r\n").lower()  # the blanks the schema's pattern allows
    if value in ("", "none"):
        return None
    if value not in ALGORITHM_WIRE_VALUES:
        raise SchedulerError(
            f"unknown algorithm_type {algorithm_type!r}. Use one of: {', '.join(ALGORITHM_WIRE_VALUES)}"
        )
    return ALGORITHMS.get(scheduler, {}).get(value)

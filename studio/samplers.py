"""A1111 sampler and schedule-type names <-> diffusers schedulers.

A1111 v1.9+ keeps the sampler ("DPM++ 2M") and the schedule type ("Karras") apart; older infotexts and scripts use
combined names ("DPM++ 2M Karras", "k_dpmpp_2m_ka"), which ``resolve_sampler`` splits. diffusers is imported only
inside ``make_scheduler`` so importing this module stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import StudioError


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    cls: str                                   # diffusers class name
    overrides: dict = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)  # A1111's options dict, as /sdapi/v1/samplers shows it
    timesteps: bool = False                    # A1111 "timesteps" sampler: it ignores the schedule type

    @property
    def default_schedule(self) -> str | None:
        """The schedule A1111 uses for "Automatic" (label), or None when it is the model's own (uniform)."""
        name = self.options.get("scheduler")
        return _SCHEDULES_BY_NAME[name].label if name else None


_DPM_MS = "DPMSolverMultistepScheduler"
_SDE = {"algorithm_type": "sde-dpmsolver++"}

# A1111 v1.10.1 order (sd_samplers.all_samplers: k-diffusion, then timesteps samplers, then LCM).
_SPECS = [
    SamplerSpec("DPM++ 2M", _DPM_MS, {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"},
                ("k_dpmpp_2m",), {"scheduler": "karras"}),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde",),
                {"scheduler": "karras", "second_order": True, "brownian_noise": True}),
    SamplerSpec("DPM++ 2M SDE", _DPM_MS, {**_SDE, "solver_order": 2, "solver_type": "midpoint"}, ("k_dpmpp_2m_sde",),
                {"scheduler": "exponential", "brownian_noise": True}),
    SamplerSpec("DPM++ 2M SDE Heun", _DPM_MS, {**_SDE, "solver_order": 2, "solver_type": "heun"},
                ("k_dpmpp_2m_sde_heun",), {"scheduler": "exponential", "brownian_noise": True, "solver_type": "heun"}),
    # diffusers has no ancestral single-step DPM++; the single-step 2nd-order solver is the nearest relative.
    SamplerSpec("DPM++ 2S a", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                   "lower_order_final": True},
                ("k_dpmpp_2s_a",), {"scheduler": "karras", "uses_ensd": True, "second_order": True}),
    SamplerSpec("DPM++ 3M SDE", _DPM_MS, {**_SDE, "solver_order": 3, "solver_type": "midpoint"}, ("k_dpmpp_3m_sde",),
                {"scheduler": "exponential", "discard_next_to_last_sigma": True, "brownian_noise": True}),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral"),
                {"uses_ensd": True}),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, ("k_euler",), {}),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, ("k_lms",), {}),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, ("k_heun",), {"second_order": True}),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",),
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "second_order": True}),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",),
                {"scheduler": "karras", "discard_next_to_last_sigma": True, "uses_ensd": True, "second_order": True}),
    SamplerSpec("DDIM", "DDIMScheduler", {}, ("ddim",), {}, timesteps=True),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",), {}, timesteps=True),
    # A1111's UniPC defaults are variant bh1, order 3; diffusers 0.42's bh1 turns the tiny models' latents into
    # NaNs (seen in tests/test_engine.py), so we keep its bh2 variant with A1111's order and lower-order final.
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {"solver_order": 3, "lower_order_final": True}, ("unipc",), {}, timesteps=True),
    SamplerSpec("LCM", "LCMScheduler", {}, ("lcm",), {}, timesteps=True),
]

# A1111 samplers with no diffusers counterpart: named so the error says "not supported" rather than "unknown".
UNSUPPORTED_SAMPLERS = ("DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")

# Pre-1.9 aliases that carried the schedule in the name (sd_samplers_kdiffusion.py of v1.5-v1.8).
_LEGACY_ALIASES = {
    "k_lms_ka": ("LMS", "Karras"), "k_dpm_2_ka": ("DPM2", "Karras"), "k_dpm_2_a_ka": ("DPM2 a", "Karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "Karras"), "k_dpmpp_2m_ka": ("DPM++ 2M", "Karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "Karras"), "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "Karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "Exponential"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "Karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "Exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "Karras"), "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "Exponential"),
}


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    label: str
    default_rho: float = -1
    need_inner_model: bool = False
    aliases: tuple[str, ...] | None = None
    # how it maps onto diffusers: one of the use_*_sigmas flags, or a timestep spacing (+ steps_offset)
    sigmas_flag: str | None = None
    spacing: str | None = None
    steps_offset: int | None = None


# A1111 v1.10.1 sd_schedulers.schedulers, in order, limited to those diffusers can reproduce.
_SCHEDULES = [
    ScheduleSpec("automatic", "Automatic"),
    # "uniform" = k-diffusion get_sigmas(n): t evenly from 999 to 0 -> diffusers "linspace" spacing.
    ScheduleSpec("uniform", "Uniform", need_inner_model=True, spacing="linspace"),
    ScheduleSpec("karras", "Karras", default_rho=7.0, sigmas_flag="use_karras_sigmas"),
    ScheduleSpec("exponential", "Exponential", sigmas_flag="use_exponential_sigmas"),
    # sgm_uniform = linspace(t_max, t_min, n+1)[:-1], i.e. the last step is not at t=0 -> "trailing".
    ScheduleSpec("sgm_uniform", "SGM Uniform", need_inner_model=True, aliases=("SGMUniform",), spacing="trailing"),
    # simple = every (1000/n)-th sigma counted from the top: diffusers "trailing" exactly.
    ScheduleSpec("simple", "Simple", need_inner_model=True, spacing="trailing"),
    # normal = timesteps linspace(t(sigma_max), t(sigma_min), n): same grid as uniform.
    ScheduleSpec("normal", "Normal", need_inner_model=True, spacing="linspace"),
    # ddim = every (1000//n)-th timestep starting at 1: "leading" with steps_offset 1.
    ScheduleSpec("ddim", "DDIM", need_inner_model=True, spacing="leading", steps_offset=1),
    # A1111 beta uses alpha = beta = 0.6 by default, as diffusers does.
    ScheduleSpec("beta", "Beta", need_inner_model=True, sigmas_flag="use_beta_sigmas"),
]
# A1111 schedules that would need hand-made sigma lists; named so the error says "not supported".
UNSUPPORTED_SCHEDULES = ("Polyexponential", "KL Optimal", "Align Your Steps")

_SCHEDULES_BY_NAME = {s.name: s for s in _SCHEDULES}
_SPECS_BY_NAME = {s.name: s for s in _SPECS}

SAMPLERS: tuple[str, ...] = tuple(s.name for s in _SPECS)
SCHEDULE_TYPES: tuple[str, ...] = tuple(s.label for s in _SCHEDULES)
_SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _sampler_lookup() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {}
    for spec in _SPECS:
        table[spec.name.lower()] = (spec.name, None)
        for alias in spec.aliases:
            table[alias.lower()] = (spec.name, None)
    for alias, pair in _LEGACY_ALIASES.items():
        table[alias] = pair
    return table


def _schedule_lookup() -> dict[str, str]:
    table = {}
    for s in _SCHEDULES:
        for key in (s.name, s.label, *(s.aliases or ())):
            table[key.lower()] = s.label
    return table


_SAMPLER_TABLE = _sampler_lookup()
_SCHEDULE_TABLE = _schedule_lookup()
# Longest first so "X SGM Uniform" is not read as "X SGM" + "Uniform".
_SUFFIXES = sorted({(key.lower(), s.label) for s in _SCHEDULES for key in (s.label, *(s.aliases or ()))},
                   key=lambda kv: -len(kv[0]))


def split_legacy_name(name: str) -> tuple[str, str | None] | None:
    """Known sampler name or alias -> (sampler, schedule or None); a combined name such as "DPM++ 2M Karras" is
    split. Returns None for anything unknown. Matching ignores case and surrounding spaces."""
    key = " ".join(name.split()).lower()
    if key in _SAMPLER_TABLE:
        return _SAMPLER_TABLE[key]
    for suffix, label in _SUFFIXES:
        if key.endswith(" " + suffix):
            base = _SAMPLER_TABLE.get(key[: -len(suffix) - 1])
            if base is not None and base[1] is None:
                return base[0], label
    return None


def _unknown_sampler(name: str) -> StudioError:
    lowered = {n.lower(): n for n in UNSUPPORTED_SAMPLERS}
    valid = ", ".join(SAMPLERS)
    if name.strip().lower() in lowered:
        return StudioError(f"Sampler {lowered[name.strip().lower()]!r} exists in A1111 but has no diffusers "
                           "counterpart in the studio.", field="sampler_name", fix=f"use one of: {valid}")
    return StudioError(f"Unknown sampler {name!r}.", field="sampler_name", fix=f"use one of: {valid}")


def resolve_schedule(scheduler: str | None) -> str:
    """Schedule type name, label or alias (any case) -> its A1111 label. Raises StudioError(field="scheduler")."""
    if scheduler is None or not str(scheduler).strip():
        return "Automatic"
    label = _SCHEDULE_TABLE.get(" ".join(str(scheduler).split()).lower())
    if label is not None:
        return label
    valid = ", ".join(SCHEDULE_TYPES)
    if any(str(scheduler).strip().lower() == u.lower() for u in UNSUPPORTED_SCHEDULES):
        raise StudioError(f"Schedule type {scheduler!r} exists in A1111 but is not supported by the studio.",
                          field="scheduler", fix=f"use one of: {valid}")
    raise StudioError(f"Unknown schedule type {scheduler!r}.", field="scheduler", fix=f"use one of: {valid}")


def resolve_sampler(sampler_name: str | None, scheduler: str | None = "Automatic") -> tuple[str, str]:
    """(sampler, schedule type) as given by a user, script or infotext -> canonical A1111 (name, label).

    Empty values take A1111's defaults (first sampler, "Automatic"). As in A1111's get_sampler_and_scheduler, a
    schedule carried in a combined sampler name ("DPM++ 2M Karras") wins over the separate schedule argument.
    """
    schedule = resolve_schedule(scheduler)
    if sampler_name is None or not str(sampler_name).strip():
        return SAMPLERS[0], schedule
    found = split_legacy_name(str(sampler_name))
    if found is None:
        raise _unknown_sampler(str(sampler_name))
    sampler, implied = found
    return sampler, implied or schedule


def sampler_spec(sampler_name: str) -> SamplerSpec:
    return _SPECS_BY_NAME[resolve_sampler(sampler_name)[0]]


def effective_schedule(sampler_name: str, scheduler: str = "Automatic") -> str:
    """The schedule label A1111 reports in the infotext: "Automatic" resolves to the sampler's default schedule
    (e.g. Karras for DPM++ 2M); samplers without one keep "Automatic"."""
    sampler, schedule = resolve_sampler(sampler_name, scheduler)
    if schedule == "Automatic":
        return _SPECS_BY_NAME[sampler].default_schedule or "Automatic"
    return schedule


def make_scheduler(sampler_name: str, scheduler: str, base_config: dict) -> tuple[Any, list[str]]:
    """Build the diffusers scheduler for an A1111 sampler + schedule type from a model's scheduler config.

    Options the scheduler class cannot take become warnings (the class's own default is used instead).
    """
    import diffusers  # heavy: only when a scheduler is actually built

    sampler, schedule = resolve_sampler(sampler_name, scheduler)
    spec = _SPECS_BY_NAME[sampler]
    cls = getattr(diffusers, spec.cls)
    accepted = _init_params(cls)
    warnings: list[str] = []

    overrides: dict[str, Any] = dict(spec.overrides)
    label = schedule
    if schedule == "Automatic":
        if spec.timesteps:
            label = None                 # A1111 timesteps samplers use the model's own grid: keep the config
        else:
            label = spec.default_schedule or "Uniform"
    if label is not None:
        sched = next(s for s in _SCHEDULES if s.label == label)
        wanted: dict[str, Any] = {}
        if sched.sigmas_flag:
            wanted = {flag: flag == sched.sigmas_flag for flag in _SIGMA_FLAGS}
            # Several diffusers classes take sigma_max/min from the spaced timesteps; "linspace" starts at t=999
            # and ends at t=0, giving the model's full range as A1111 uses (sigma_min/max of the model).
            wanted["timestep_spacing"] = "linspace"
        else:
            # reset sigma flags a pipeline config may carry, then pick the timestep grid
            wanted = {flag: False for flag in _SIGMA_FLAGS}
            wanted["timestep_spacing"] = sched.spacing
            if sched.steps_offset is not None:
                wanted["steps_offset"] = sched.steps_offset
        key = sched.sigmas_flag or "timestep_spacing"
        if key not in accepted:
            if schedule != "Automatic":
                warnings.append(f"Schedule type {label!r} is not supported by {sampler} ({spec.cls}) in diffusers; "
                                "its default schedule was used.")
        else:
            overrides.update({k: v for k, v in wanted.items() if k in accepted})
    if "use_beta_sigmas" in overrides and overrides["use_beta_sigmas"]:
        try:
            import scipy  # noqa: F401  (diffusers needs it for beta sigmas)
        except ImportError:
            overrides["use_beta_sigmas"] = False
            warnings.append("Schedule type 'Beta' needs scipy, which is not installed; the default schedule was "
                            "used.")
    if spec.cls == "DPMSolverSDEScheduler":
        try:
            import torchsde  # noqa: F401
        except ImportError as exc:
            raise StudioError("Sampler 'DPM++ SDE' needs the torchsde package.", field="sampler_name",
                              fix="pip install torchsde, or choose another sampler") from exc

    config = {k: v for k, v in dict(base_config).items() if k in accepted or k.startswith("_")}
    return cls.from_config(config, **overrides), warnings


def _init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def samplers_api() -> list[dict]:
    """GET /sdapi/v1/samplers: [{name, aliases, options}] in A1111's order (options are A1111's)."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in _SPECS]


def schedulers_api() -> list[dict]:
    """GET /sdapi/v1/schedulers: [{name, label, aliases, default_rho, need_inner_model}]."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) if s.aliases else None,
             "default_rho": s.default_rho, "need_inner_model": s.need_inner_model} for s in _SCHEDULES]


# ---- flow-matching models (FLUX, SD3) ----------------------------------------------------------------------------
# A1111 / Forge names -> diffusers flow schedulers. Each takes the model's own shift (dynamic for FLUX dev).
_FLOW_EULER = "FlowMatchEulerDiscreteScheduler"
_FLOW_SPECS = {
    "Euler": (_FLOW_EULER, {}),
    # ancestral-style: fresh noise at every step (diffusers' stochastic flow sampling)
    "Euler a": (_FLOW_EULER, {"stochastic_sampling": True}),
    "DPM++ 2M": (_DPM_MS, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                           "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPC": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
}
_FLOW_SCHEDULES = {"Automatic": {}, "Simple": {}, "Normal": {}, "Uniform": {}, "SGM Uniform": {},
                   "Karras": {"use_karras_sigmas": True}, "Exponential": {"use_exponential_sigmas": True},
                   "Beta": {"use_beta_sigmas": True}}
FLOW_SAMPLERS: tuple[str, ...] = tuple(_FLOW_SPECS)


def make_flow_scheduler(sampler_name: str, scheduler: str, base_config: dict) -> tuple[Any, list[str]]:
    """A flow-matching scheduler for an A1111 sampler + schedule type (FLUX / SD3 models). Samplers diffusers
    has no flow version of run as Euler, with a warning naming them."""
    import diffusers

    sampler, schedule = resolve_sampler(sampler_name, scheduler)
    warnings: list[str] = []
    if sampler not in _FLOW_SPECS:
        warnings.append(f"Sampler {sampler!r} has no flow-matching version in diffusers; Euler was used "
                        f"(flow models take {', '.join(FLOW_SAMPLERS)}).")
        sampler = "Euler"
    dynamic = bool(base_config.get("use_dynamic_shifting"))
    if _FLOW_SPECS[sampler][0] != _FLOW_EULER and not dynamic:
        # diffusers' FLUX pipelines always hand the scheduler a resolution shift (mu); the multistep solvers
        # accept it only for a dynamically shifted model (dev), so a fixed-shift one (schnell) runs Euler
        warnings.append(f"Sampler {sampler!r} needs a model with a resolution-dependent shift; this one has a "
                        "fixed shift, so Euler was used.")
        sampler = "Euler"
    cls_name, overrides = _FLOW_SPECS[sampler]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    if cls_name != _FLOW_EULER:   # the multistep solvers read the model's shift as flow_shift (and get mu from
        # the pipeline for a dynamically shifted model)
        config = {"num_train_timesteps": config.get("num_train_timesteps", 1000),
                  "flow_shift": config.get("shift", 1.0), "use_dynamic_shifting": dynamic}
    extra = _FLOW_SCHEDULES.get(schedule)
    if extra is None or (extra and cls_name != _FLOW_EULER):
        if schedule != "Automatic":
            warnings.append(f"Schedule type {schedule!r} is not available for {sampler} on a flow model; the "
                            "model's own schedule was used.")
        extra = {}
    config = {k: v for k, v in {**config, **overrides, **extra}.items() if k in _init_params(cls)}
    return cls.from_config(config), warnings

"""A1111 sampler / schedule names -> diffusers schedulers."""
import pytest
import torch

from studio import samplers as S
from studio.errors import StudioError

SD_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "trained_betas": None,
}

REQUIRED = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE",
            "DPM++ 2S a", "DPM++ 3M SDE", "DDIM", "PLMS", "UniPC", "LCM"]


def test_names_and_order():
    assert set(REQUIRED) <= set(S.SAMPLERS)
    assert S.SAMPLERS[0] == "DPM++ 2M"  # A1111's default sampler comes first
    assert S.SCHEDULE_TYPES[:5] == ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform")
    assert "Beta" in S.SCHEDULE_TYPES


@pytest.mark.parametrize("name", S.SAMPLERS)
def test_every_sampler_builds_and_sets_timesteps(name):
    sched, warnings = S.make_scheduler(name, "Automatic", SD_CONFIG)
    assert warnings == []
    sched.set_timesteps(4)
    assert len(sched.timesteps) >= 4
    assert sched.config.prediction_type == "epsilon"


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC", "DPM++ 2M SDE"])
def test_one_step_runs(name):
    torch.manual_seed(0)
    sched, _ = S.make_scheduler(name, "Automatic", SD_CONFIG)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8) * sched.init_noise_sigma
    t = sched.timesteps[0]
    out = sched.step(torch.randn(1, 4, 8, 8), t, sched.scale_model_input(x, t)).prev_sample
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("schedule", S.SCHEDULE_TYPES)
def test_every_schedule_with_euler_and_dpmpp(schedule):
    for name in ("Euler", "DPM++ 2M"):
        sched, warnings = S.make_scheduler(name, schedule, SD_CONFIG)
        assert warnings == []
        sched.set_timesteps(4)


def test_classes_and_options():
    cls = lambda n, s="Automatic": type(S.make_scheduler(n, s, SD_CONFIG)[0]).__name__  # noqa: E731
    assert cls("Euler a") == "EulerAncestralDiscreteScheduler"
    assert cls("DPM2 a") == "KDPM2AncestralDiscreteScheduler"
    assert cls("DPM++ SDE") == "DPMSolverSDEScheduler"
    assert cls("PLMS") == "PNDMScheduler"
    sde, _ = S.make_scheduler("DPM++ 2M SDE", "Automatic", SD_CONFIG)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_exponential_sigmas
    m3, _ = S.make_scheduler("DPM++ 3M SDE", "Automatic", SD_CONFIG)
    assert m3.config.solver_order == 3
    k, _ = S.make_scheduler("DPM++ 2M", "Automatic", SD_CONFIG)  # A1111 default for DPM++ 2M is Karras
    assert k.config.use_karras_sigmas and not k.config.use_exponential_sigmas
    u, _ = S.make_scheduler("DPM++ 2M", "Uniform", {**SD_CONFIG, "use_karras_sigmas": True})
    assert not u.config.use_karras_sigmas and u.config.timestep_spacing == "linspace"
    sgm, _ = S.make_scheduler("Euler", "SGM Uniform", SD_CONFIG)
    assert sgm.config.timestep_spacing == "trailing"
    beta, _ = S.make_scheduler("Euler", "Beta", SD_CONFIG)
    assert beta.config.use_beta_sigmas


def test_karras_uses_full_sigma_range_like_a1111():
    # A1111 Karras runs from the model's sigma_max (~14.61) to sigma_min (~0.029), then 0.
    sched, _ = S.make_scheduler("Euler", "Karras", SD_CONFIG)
    sched.set_timesteps(4)
    sig = [round(float(s), 3) for s in sched.sigmas]
    assert sig[0] == pytest.approx(14.615, abs=1e-3) and sig[-2] == pytest.approx(0.029, abs=1e-3) and sig[-1] == 0


def test_unsupported_option_is_a_warning():
    sched, warnings = S.make_scheduler("Euler a", "Karras", SD_CONFIG)
    assert type(sched).__name__ == "EulerAncestralDiscreteScheduler"
    assert len(warnings) == 1 and "Karras" in warnings[0] and "Euler a" in warnings[0]
    _, warnings = S.make_scheduler("DDIM", "Exponential", SD_CONFIG)
    assert warnings
    _, warnings = S.make_scheduler("DPM++ 2S a", "SGM Uniform", SD_CONFIG)
    assert warnings


def test_v_prediction_passes_through():
    sched, _ = S.make_scheduler("Euler", "Automatic", {**SD_CONFIG, "prediction_type": "v_prediction"})
    assert sched.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("given, expected", [
    (("DPM++ 2M", "Automatic"), ("DPM++ 2M", "Automatic")),
    (("DPM++ 2M Karras", "Automatic"), ("DPM++ 2M", "Karras")),
    (("dpm++ 2m karras", None), ("DPM++ 2M", "Karras")),
    (("DPM++ SDE Karras", "Automatic"), ("DPM++ SDE", "Karras")),
    (("DPM++ 2M SDE Exponential", "Automatic"), ("DPM++ 2M SDE", "Exponential")),
    (("DPM++ 2M SDE Heun Karras", "Automatic"), ("DPM++ 2M SDE Heun", "Karras")),
    (("DPM++ 3M SDE Karras", "Automatic"), ("DPM++ 3M SDE", "Karras")),
    (("Euler SGM Uniform", "Automatic"), ("Euler", "SGM Uniform")),
    (("Euler SGMUniform", "Automatic"), ("Euler", "SGM Uniform")),
    (("LMS Karras", "Automatic"), ("LMS", "Karras")),
    (("DPM2 a Karras", "Automatic"), ("DPM2 a", "Karras")),
    (("k_euler_a", "Automatic"), ("Euler a", "Automatic")),
    (("k_euler_ancestral", "karras"), ("Euler a", "Karras")),
    (("K_DPMPP_2M_KA", "Automatic"), ("DPM++ 2M", "Karras")),
    (("k_dpmpp_2m_sde_exp", "Automatic"), ("DPM++ 2M SDE", "Exponential")),
    (("k_lms", "Automatic"), ("LMS", "Automatic")),
    (("  euler  a ", "sgm_uniform"), ("Euler a", "SGM Uniform")),
    (("ddim", "Automatic"), ("DDIM", "Automatic")),
    (("Euler", "beta"), ("Euler", "Beta")),
    (("", ""), ("DPM++ 2M", "Automatic")),
    # as in A1111's get_sampler_and_scheduler, a schedule in the name wins
    (("DPM++ 2M Karras", "Exponential"), ("DPM++ 2M", "Karras")),
])
def test_resolve(given, expected):
    assert S.resolve_sampler(*given) == expected


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(StudioError) as err:
        S.resolve_sampler("Eulr", "Automatic")
    assert err.value.field == "sampler_name"
    assert "DPM++ 2M" in str(err.value) and "Euler a" in str(err.value)
    with pytest.raises(StudioError) as err:
        S.resolve_sampler("DPM adaptive")
    assert err.value.field == "sampler_name" and "A1111" in str(err.value)
    with pytest.raises(StudioError) as err:
        S.make_scheduler("nope", "Automatic", SD_CONFIG)
    assert err.value.field == "sampler_name"


def test_unknown_schedule():
    with pytest.raises(StudioError) as err:
        S.resolve_sampler("Euler", "Karas")
    assert err.value.field == "scheduler" and "Karras" in str(err.value)
    with pytest.raises(StudioError) as err:
        S.resolve_sampler("Euler", "Align Your Steps")
    assert err.value.field == "scheduler"


def test_effective_schedule():
    assert S.effective_schedule("DPM++ 2M", "Automatic") == "Karras"
    assert S.effective_schedule("DPM++ 2M SDE", "Automatic") == "Exponential"
    assert S.effective_schedule("Euler a", "Automatic") == "Automatic"
    assert S.effective_schedule("DDIM", "Automatic") == "Automatic"
    assert S.effective_schedule("Euler a", "Uniform") == "Uniform"


def test_api_shapes():
    api = S.samplers_api()
    assert [s["name"] for s in api] == list(S.SAMPLERS)
    first = api[0]
    assert set(first) == {"name", "aliases", "options"}
    assert first == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    scheds = S.schedulers_api()
    assert scheds[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                         "need_inner_model": False}
    karras = next(s for s in scheds if s["name"] == "karras")
    assert karras["default_rho"] == 7.0
    sgm = next(s for s in scheds if s["name"] == "sgm_uniform")
    assert sgm["aliases"] == ["SGMUniform"] and sgm["need_inner_model"] is True
    # returned lists are copies: callers cannot change the module's tables
    api[0]["aliases"].append("x")
    assert S.samplers_api()[0]["aliases"] == ["k_dpmpp_2m"]


def test_import_does_not_load_diffusers():
    import subprocess
    import sys

    code = "import sys, studio.samplers; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Training noise schedules, and the σ sequences that samplers walk down.

A diffusion model is trained on T discrete timesteps t = 0 … T−1 (t = 0 least noisy). The
schedule fixes how much noise each timestep adds (DDPM, Ho et al. 2020, eq. 2 and 4):

    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε,        ε ~ N(0, I)          (VP form, DDPM eq. 4)

Dividing by √ᾱ_t gives the "variance exploding" (VE) form used by the samplers (k-diffusion,
EDM), where the noise level is a single number σ:

    x = x0 + σ · ε,        σ_t = √((1 − ᾱ_t) / ᾱ_t)                (VE form)

Symbols (arrays are indexed by t = 0 … T−1)

    T        number of training timesteps (1000 in DDPM and Stable Diffusion)
    β_t      variance added at step t                      betas
    α_t      1 − β_t
    ᾱ_t      ∏_{s ≤ t} α_s, the signal fraction kept        alphas_cumprod
    σ_t      √((1 − ᾱ_t)/ᾱ_t), the VE noise level           sigmas
    λ_t      log SNR = log(ᾱ_t / (1 − ᾱ_t)) = −2 log σ_t    log_snr

Three β schedules are provided, named by what they compute:

    linear         β linear from 1e-4 to 0.02                       (DDPM §4)
    scaled_linear  √β linear from √0.00085 to √0.012                 (Stable Diffusion)
    cosine         ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008,
                   β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at 0.999         (Nichol & Dhariwal eq. 17)

Naming trap: the LDM/CompVis code calls the Stable Diffusion schedule "linear" although it is
linear in √β; diffusers calls it "scaled_linear", and CompVis' "sqrt_linear" is plain linear.
Here a name always says what is computed.

Zero terminal SNR (Lin et al. 2023, Algorithm 1) shifts and scales √ᾱ so that ᾱ_{T−1} = 0
exactly: the last timestep is pure noise, as it is at inference. Then σ_{T−1} = ∞, which the
VE form cannot hold. The σ table (and so `sigma_to_t` and the sampler sequences) continues log σ
in a straight line from the two previous steps instead: σ_{T−1} = σ_{T−2}²/σ_{T−3} (linear:
≈ 3.1·10⁴, scaled_linear: ≈ 4.5·10³, cosine: ≈ 1.3·10³). diffusers uses ᾱ = 2⁻²⁴ (σ ≈ 4096)
there, which for the linear schedule is *below* σ_{T−2} ≈ 1.5·10⁴ and breaks monotonicity.

A sampler needs a decreasing σ sequence ending with 0 (the last step lands on clean data):

    karras     σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7   (EDM eq. 5)
    leading    t = [0, k, 2k, …, (n−1)k] reversed + steps_offset, k = T // n   (diffusers)
    trailing   t = round(T − i·T/n) − 1 for i = 0 … n−1: starts at T − 1           (Lin et al. §3.3)
    linspace   t = round(linspace(0, T − 1, n)) reversed: starts at T − 1, ends at 0

`leading` with steps_offset = 0 never reaches t = T − 1 (diffusers #2585): with T = 1000 and
n = 50 it starts at t = 980, so sampling begins from noise the network was never shown at that
level. `trailing` and `linspace` start at T − 1.

Schedules are tiny, so everything here is float64 NumPy on the CPU; code that runs on a device
moves what it needs with ``tinydiff.backend.to_device``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("karras", "leading", "trailing", "linspace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# sigma_to_t accepts σ up to σ_max·(1 + this): karras_sigmas' σ_0 = (σ_max^{1/ρ})^ρ can differ
# from σ_max in the last bits.
SIGMA_MAX_RTOL = 1e-9


def _check_count(what: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{what} must be an integer >= 1; got {n!r}")


# ---------------------------------------------------------------------------------------------
# β schedules
# ---------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β linear in t (DDPM §4): (T,) float64."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """√β linear in t (Stable Diffusion; "linear" in the LDM code): (T,) float64."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal eq. 17: ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ/T + s)/(1 + s)·π/2).

    Timestep index t covers τ from t to t + 1, so β_t = 1 − f((t+1)/T)/f(t/T) (the f(0)
    cancels), clipped at ``max_beta`` to avoid the singularity at τ = T.
    """
    tau = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # (T+1,) in [0, 1]
    f = np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: new β with ᾱ_{T−1} = 0 exactly and ᾱ_0 unchanged.

    √ᾱ is shifted so its last value is 0, then scaled so its first value is what it was:
    √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}). The last α' is then 0, so β'_{T−1} = 1.
    """
    sqrt_ab = np.sqrt(np.cumprod(1 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)  # sqrt_ab[-1] is exactly 0.0
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])  # α_t = ᾱ_t / ᾱ_{t−1}
    return 1 - alphas


_BETA_FUNCTIONS = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


# ---------------------------------------------------------------------------------------------
# The schedule object
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A training schedule: β_t and ᾱ_t for t = 0 … T−1 as read-only float64 arrays.

    Everything else (σ_t, log SNR) is derived on demand; there is no hidden state. Build one
    with `make_schedule`, or directly from any β array with `NoiseSchedule.from_betas`.
    """

    name: str
    betas: np.ndarray  # (T,) β_t in (0, 1]
    alphas_cumprod: np.ndarray  # (T,) ᾱ_t = ∏_{s≤t} (1 − β_s), decreasing from ≈1 towards 0

    def __post_init__(self):
        for field in ("betas", "alphas_cumprod"):
            array = np.array(getattr(self, field), dtype=np.float64)  # a private copy
            array.setflags(write=False)
            object.__setattr__(self, field, array)
        if self.betas.ndim != 1 or self.betas.shape != self.alphas_cumprod.shape:
            raise ValueError("betas and alphas_cumprod must be 1-D arrays of the same length")
        if not np.all((self.betas > 0) & (self.betas <= 1)):
            raise ValueError("every beta must lie in (0, 1]")
        if np.any(self.alphas_cumprod[:-1] <= 0) or np.any(np.diff(self.alphas_cumprod) >= 0):
            raise ValueError("alphas_cumprod must decrease strictly and stay > 0 (only the last may be 0)")

    @classmethod
    def from_betas(cls, betas, name: str = "custom") -> NoiseSchedule:
        """The schedule with these β: ᾱ_t = ∏_{s≤t} (1 − β_s) (DDPM eq. 4)."""
        betas = np.asarray(betas, dtype=np.float64)
        return cls(name, betas, np.cumprod(1 - betas))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> np.ndarray:
        """(T,) σ_t = √((1 − ᾱ_t)/ᾱ_t), increasing and finite.

        A zero-terminal-SNR last step (ᾱ = 0, σ = ∞) gets σ_{T−2}²/σ_{T−3}: log σ extrapolated
        linearly from the two steps before it.
        """
        with np.errstate(divide="ignore"):
            sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        if np.isinf(sigmas[-1]):
            sigmas[-1] = sigmas[-2] ** 2 / sigmas[-3]
        return sigmas

    @property
    def log_snr(self) -> np.ndarray:
        """(T,) λ_t = log(ᾱ_t/(1 − ᾱ_t)), decreasing; −∞ at a zero-terminal-SNR last step."""
        with np.errstate(divide="ignore"):
            return np.log(self.alphas_cumprod) - np.log1p(-self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


def make_schedule(name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False) -> NoiseSchedule:
    """The named training schedule ('linear', 'scaled_linear' or 'cosine') over T timesteps.

    ``zero_terminal_snr=True`` applies Lin et al.'s rescaling so that ᾱ_{T−1} = 0 exactly; pair
    it with v-prediction (an ε-network cannot recover x0 from pure noise: diffusers #3851).
    """
    if name not in _BETA_FUNCTIONS:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    _check_count("num_timesteps", num_timesteps)
    betas = _BETA_FUNCTIONS[name](num_timesteps)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
        name += "+zero_terminal_snr"
    return NoiseSchedule.from_betas(betas, name)


# ---------------------------------------------------------------------------------------------
# Continuous timesteps <-> σ (interpolation in log σ, as k-diffusion's DiscreteSchedule)
# ---------------------------------------------------------------------------------------------


def t_to_sigma(schedule: NoiseSchedule, t) -> np.ndarray:
    """σ at continuous timesteps t ∈ [0, T−1]: log σ interpolated linearly between integers."""
    t = np.asarray(t, dtype=np.float64)
    if np.any(~np.isfinite(t)) or np.any(t < 0) or np.any(t > schedule.num_timesteps - 1):
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}]; got {t}")
    log_sigmas = np.log(schedule.sigmas)
    return np.exp(np.interp(t, np.arange(schedule.num_timesteps), log_sigmas))


def sigma_to_t(schedule: NoiseSchedule, sigma) -> np.ndarray:
    """The continuous timestep of noise level σ (the inverse of `t_to_sigma`).

    σ between σ_min = σ_0 and σ_max = σ_{T−1}: interpolated in log σ.
    σ below σ_min, including σ = 0: t = 0, the least noisy level the network was trained on.
    σ above σ_max: ValueError, since the network has never seen that much noise.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    if np.any(~(sigma >= 0)):  # also catches NaN
        raise ValueError(f"sigma must be >= 0; got {sigma}")
    if np.any(sigma > schedule.sigma_max * (1 + SIGMA_MAX_RTOL)):
        raise ValueError(
            f"sigma {sigma.max():.6g} exceeds the schedule's largest sigma {schedule.sigma_max:.6g} "
            f"({schedule.name}, T={schedule.num_timesteps}); cap sigma_max at schedule.sigma_max"
        )
    log_sigma = np.log(np.maximum(sigma, schedule.sigma_min))
    return np.interp(log_sigma, np.log(schedule.sigmas), np.arange(schedule.num_timesteps, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# σ sequences for sampling
# ---------------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """EDM eq. 5: n noise levels from σ_max down to σ_min, dense near σ_min, then a final 0.

    Returns (n + 1,) float64. With n = 1 the single step goes from σ_max straight to 0.
    """
    _check_count("number of steps", n)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, n)  # i/(n−1), or [0] when n = 1
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return np.append(sigmas, 0.0)


def spaced_timesteps(num_timesteps: int, n: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """n distinct integer timesteps in decreasing order, by diffusers' spacing rules.

    Raises ValueError for n > T (rounding would repeat timesteps and silently run fewer steps,
    diffusers #4122) and when ``steps_offset`` would push a timestep past T − 1 (diffusers
    #10003: n = T with offset 1 asks for t = T). ``steps_offset`` applies to 'leading' only.
    """
    T = num_timesteps
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid spacings: {', '.join(TIMESTEP_SPACINGS)}")
    _check_count("number of steps", n)
    if n > T:
        raise ValueError(f"cannot take {n} steps on a schedule of {T} timesteps (at most {T})")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to 'leading' spacing only, not {spacing!r}")
    if spacing == "leading":
        timesteps = np.arange(n)[::-1] * (T // n) + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(T - np.arange(n) * (T / n)).astype(np.int64) - 1
    else:  # linspace
        timesteps = np.round(np.linspace(0, T - 1, n)).astype(np.int64)[::-1]
    if timesteps[0] > T - 1 or timesteps[-1] < 0:
        raise ValueError(
            f"{spacing} spacing with n={n}, steps_offset={steps_offset} gives timesteps "
            f"{timesteps[-1]}..{timesteps[0]}, outside [0, {T - 1}]"
        )
    return timesteps.astype(np.int64)


def timestep_sigmas(schedule: NoiseSchedule, timesteps) -> np.ndarray:
    """σ at the given integer timesteps, with the final 0 appended: (n + 1,) float64."""
    return np.append(schedule.sigmas[np.asarray(timesteps)], 0.0)


def get_sigmas(
    schedule: NoiseSchedule, n: int, spacing: str = "karras", *, steps_offset: int = 0, rho: float = 7.0,
    sigma_max: float | None = None,
) -> np.ndarray:
    """The (n + 1,) decreasing σ sequence, ending with 0, for n sampling steps.

    'karras' spans the schedule's [σ_min, σ_max] with EDM's ρ-spacing; 'leading', 'trailing'
    and 'linspace' take σ at integer training timesteps chosen by `spaced_timesteps`.

    ``sigma_max`` caps where sampling starts (None: the schedule's own σ_max). An ε-predicting
    network's x0 estimate is x − σ·ε̂, so its error is σ times the ε error: started at the linear
    schedule's σ_max ≈ 157, the first steps' x0 estimates are mostly error and samples come out
    broken (chapters/references.md, "Traps the tests pin"). Starting at σ ≈ 15 (Stable Diffusion's own σ_max) the
    signal is already 1/15 of the noise. For the timestep spacings the cap keeps the steps among
    the training timesteps whose σ does not exceed it.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    top = schedule.sigma_max if sigma_max is None else min(float(sigma_max), schedule.sigma_max)
    if not top > schedule.sigma_min:
        raise ValueError(f"sigma_max {sigma_max} must exceed the schedule's smallest sigma {schedule.sigma_min:.4g}")
    if spacing == "karras":
        if steps_offset:
            raise ValueError("steps_offset applies to 'leading' spacing only, not 'karras'")
        return karras_sigmas(n, schedule.sigma_min, top, rho)
    usable = int(np.searchsorted(schedule.sigmas, top * (1 + SIGMA_MAX_RTOL), side="right"))  # timesteps 0..usable−1
    return timestep_sigmas(schedule, spaced_timesteps(usable, n, spacing, steps_offset))

"""What a trained denoiser's output means: the settings sampling needs, recorded with the weights.

A network trained to denoise is only usable with the noise process it was trained on: the β
schedule and its number of timesteps T fix σ_t for every t (``schedules.make_schedule``), and
the prediction type says whether its output is ε, v or x0 (``noise.predicted_x0``). These three
settings travel with the weights: a saved pipeline records them in the ``"diffusion"`` section
of its ``model_index.json``.

Settings that only matter while training (batch size, conditioning dropout, loss weighting)
are not here: ``tinydiff.train.diffusion.DiffusionTrainingConfig`` extends this config with them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import ConfigMixin
from .noise import check_prediction_type
from .schedules import SCHEDULES, NoiseSchedule, make_schedule


@dataclass
class DiffusionConfig(ConfigMixin):
    """The noise process a denoiser was trained on (saved as the pipeline's "diffusion" section)."""

    schedule: str = "linear"  # β schedule name (schedules.SCHEDULES); linear keeps σ_max ≈ 157
    num_timesteps: int = 1000  # T, the number of discrete training timesteps
    prediction_type: str = "epsilon"  # what the network predicts: epsilon, v or sample (x0)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1; got {self.num_timesteps!r}")
        check_prediction_type(self.prediction_type)

    def make_schedule(self) -> NoiseSchedule:
        """The β/ᾱ/σ tables of this schedule over T timesteps."""
        return make_schedule(self.schedule, self.num_timesteps)

    def sampling_config(self) -> DiffusionConfig:
        """Just the fields of ``DiffusionConfig`` (a training config, a subclass, carries more)."""
        return DiffusionConfig(**{f.name: getattr(self, f.name) for f in fields(DiffusionConfig)})

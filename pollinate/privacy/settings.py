"""The ``[dp]`` settings table: client-level differential privacy. Standard library."""

from __future__ import annotations

from dataclasses import dataclass, field

from pollinate.methods.settings import fail, key, positive

MODES = ("off", "central", "local")
"""``central``: the server clips each update and noises their sum (it is trusted); ``local``: each
client clips and noises its own update before it leaves the device."""


@dataclass(frozen=True)
class DpSettings:
    """Clip each client's update to ``clip`` in L2 and add Gaussian noise of ``noise-multiplier`` × clip."""

    mode: str = field(default="off", metadata=key("mode"))
    clip: float = field(default=1.0, metadata=key("clip"))
    """The L2 bound of one client's update (what it uploads minus what it received)."""
    noise_multiplier: float = field(default=1.0, metadata=key("noise-multiplier"))
    """σ: the noise's standard deviation over ``clip``."""
    delta: float = field(default=0.0, metadata=key("delta"))
    """δ of the (ε, δ) reported; 0: 1 / num-clients."""
    target_epsilon: float = field(default=0.0, metadata=key("target-epsilon"))
    """Stop before a round would take ε above this; 0: no limit."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise fail("dp.mode", self.mode, f"allowed: {', '.join(MODES)}")
        positive("dp.clip", self.clip)
        if self.noise_multiplier < 0:
            raise fail("dp.noise-multiplier", self.noise_multiplier, "it must be 0 or greater")
        if not 0 <= self.delta < 1:
            raise fail("dp.delta", self.delta, "give a value in (0, 1), or 0 for 1 / num-clients")
        if self.target_epsilon < 0:
            raise fail("dp.target-epsilon", self.target_epsilon, "it must be 0 (no limit) or greater")

    @property
    def on(self) -> bool:
        """Whether updates are clipped and noised."""
        return self.mode != "off"

    def delta_for(self, num_clients: int) -> float:
        """δ: ``delta``, or 1 / ``num_clients``."""
        return self.delta or 1.0 / num_clients

"""Training: one trainer core (:mod:`trainer`) with pluggable objectives (:mod:`objectives`), the
optimizers and schedules of the recipes (:mod:`optim`), and the config blocks they read
(:mod:`config_blocks`)."""

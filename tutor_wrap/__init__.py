"""tutor_wrap: a thin orchestration layer around Axolotl and llama.cpp.

probe -> plan -> train -> merge -> export -> deploy -> eval, with a manifest in the run directory as the
single source of truth between stages.
"""

__version__ = "0.1.0"

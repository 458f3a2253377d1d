"""qvpo: config-first reproducibility package for online RL with diffusion policies.

Data flows one way: gin file -> config -> trainer builds env + agent -> agent.act / agent.update
-> tracking -> MLflow store. Agents never touch MLflow, files or environments; the trainer never
contains algorithm maths.
"""

__version__ = "0.1.0"


def run(*args, **kwargs):
    """One tracked run from Python (see qvpo.api.run): `qvpo.run(["envs/hopper.gin"], algo="sac")`."""
    from qvpo.api import run as _run

    return _run(*args, **kwargs)

"""qvpo: config-first reproducibility package for online RL with diffusion policies.

Data flows one way: gin file -> config -> trainer builds env + agent -> agent.act / agent.update
-> tracking -> MLflow store. Agents never touch MLflow, files or environments; the trainer never
contains algorithm maths.
"""

__version__ = "0.1.0"

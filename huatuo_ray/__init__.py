"""huatuo-ray: the HuatuoGPT recipe (hybrid SFT + RLMF) as Ray jobs.

Importing the package is cheap: Ray, torch, DeepSpeed and vLLM are imported inside the stages
that use them.
"""

__version__ = "0.1.0"

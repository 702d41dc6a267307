"""The compact PyTorch MTL engine. It knows nothing of DVC or Prefect.

The names below are what ``params.yaml`` may ask for; they are kept free of a torch import so
that validating a configuration stays fast. ``archs.build`` and ``weighting.WEIGHTINGS`` map the
same names to code (a test checks they agree).
"""

ARCHITECTURES = ("hps", "stl")
WEIGHTINGS = ("ew", "static")
TASK_KINDS = ("binary", "multiclass", "regression")

# Test metrics by task kind, and whether higher is better (compare's Δm needs the direction).
METRICS = {
    "binary": ("accuracy", "f1_macro", "auroc"),
    "multiclass": ("accuracy", "f1_macro", "auroc"),
    "regression": ("mae", "rmse", "r2"),
}
HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "auroc": True,
                    "mae": False, "rmse": False, "r2": True}

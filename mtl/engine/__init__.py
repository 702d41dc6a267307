"""The compact PyTorch MTL engine. It knows nothing of DVC or Prefect.

The names below, with each method's options and their defaults, are what ``params.yaml`` may
ask for; they are kept free of a torch import so that validating a configuration stays fast.
``archs.build`` and ``weighting.build`` map the same names to classes whose keyword arguments
are these options (tests check they agree).
"""

# Each architecture and its options (a variant's ``arch_options``) with their defaults.
# ``groups``: the partition, a list of lists of task names (``mtl.config`` also takes
# ``{from: <variant>, max_groups: N}`` and resolves it before the model is built).
ARCH_OPTIONS: dict[str, dict[str, float | int | bool | str | list | None]] = {
    "hps": {},
    "stl": {},
    "mmoe": {"experts": 4},
    "cgc": {"shared_experts": 2, "task_experts": 1},
    "ple": {"shared_experts": 2, "task_experts": 1, "levels": 2},
    "cross_stitch": {},
    "mtan": {},
    "groups": {"groups": None, "inner": "hps"},
}
ARCHITECTURES = tuple(ARCH_OPTIONS)

# Each weighting and its options (a variant's ``weighting_options``) with their defaults.
WEIGHTING_OPTIONS: dict[str, dict[str, float | int | bool | str]] = {
    "ew": {},
    "static": {},  # takes the variant's ``weights`` instead
    "uw": {},
    "dwa": {"temperature": 2.0},
    "rlw": {},
    "gradnorm": {"alpha": 1.5},
    "famo": {"logit_lr": 0.025, "gamma": 0.001},
    "db_mtl": {"beta": 0.9, "beta_sigma": 0.0},
    # level "params" or "features": the gradients over the shared representation (MGDA-UB)
    "mgda": {"level": "params"},
    "pcgrad": {"level": "params"},
    "cagrad": {"c": 0.4, "level": "params"},
    "imtl": {"loss_scale": True, "level": "params"},  # loss_scale false: IMTL-G alone
    "nash_mtl": {"max_norm": 1.0, "update_weights_every": 1, "level": "params"},
    "aligned_mtl": {"scale_mode": "min", "level": "params"},  # or "median", "rmse"
    "upgrad": {"level": "params"},
}
WEIGHTINGS = tuple(WEIGHTING_OPTIONS)
TASK_KINDS = ("binary", "multiclass", "multilabel", "regression")

# Whether higher is better, for each test metric (compare's Δm needs the direction).
HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "auroc": True,
                    "mae": False, "rmse": False, "r2": True}
